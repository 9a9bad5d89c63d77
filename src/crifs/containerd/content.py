"""containerd's local content store and the image walks ``ctr images ls`` does over it.

Layout (``content/local/store.go``) under ``<root>/io.containerd.content.v1.content``:
``blobs/<alg>/<hex>`` holds committed blobs; ``ingest/<sha256 of ref>/`` holds an unfinished
write (``ref``, ``data``, ``startedat``, ``updatedat``, ``total``).

Content is namespaced in ``meta.db``: a namespace sees a blob only when it has a
``content/blob/<digest>`` record *and* the file exists, so every walk here takes an
``available`` predicate. Walks follow containerd's ``images.Walk``: depth first, in descriptor
order, stopping at the first blob that cannot be read; what was summed until then is kept and
the result says it is incomplete (``ctr images ls`` prints the same partial size).
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from crifs.containerd import schema

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
CONFIG_TYPES = frozenset({MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG})

# Manifests, indexes and configs are small; a larger "JSON" blob is treated as unreadable.
MAX_JSON_BLOB = 64 << 20

_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def format(self) -> str:
        """containerd's ``platforms.Format``: ``os/arch[/variant]``, ``unknown`` without os."""
        if not self.os:
            return "unknown"
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def normalized(self) -> Platform:
        """containerd's ``platforms.Normalize`` (os lower-cased, arch aliases folded)."""
        os_name = self.os.lower() or "linux"
        if os_name == "macos":
            os_name = "darwin"
        arch, variant = self.architecture.lower(), self.variant.lower()
        if arch == "i386":
            arch, variant = "386", ""
        elif arch in ("x86_64", "x86-64", "amd64"):
            arch = "amd64"
            variant = "" if variant == "v1" else variant
        elif arch in ("aarch64", "arm64"):
            arch = "arm64"
            variant = "" if variant in ("8", "v8") else variant
        elif arch == "armhf":
            arch, variant = "arm", "v7"
        elif arch == "armel":
            arch, variant = "arm", "v6"
        elif arch == "arm":
            if variant in ("", "7"):
                variant = "v7"
            elif variant in ("5", "6", "8"):
                variant = "v" + variant
        return Platform(os_name, arch, variant)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


class HostPlatform:
    """containerd's ``platforms.Default()``: the host platform plus what it can also run,
    most preferred first (amd64 also runs 386; arm64 also runs arm v8..v5)."""

    def __init__(self, spec: Platform | None = None) -> None:
        self.spec = (spec or _host_spec()).normalized()
        self.vector = _platform_vector(self.spec)

    def rank(self, p: Platform) -> int | None:
        """Index of the first matcher ``p`` satisfies, ``None`` when it runs nowhere here."""
        normalized = p.normalized()
        for i, want in enumerate(self.vector):
            if want == normalized:
                return i
        return None


def _host_spec() -> Platform:
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
            "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine, "")
    return Platform("linux", arch.get(machine, machine), variant)


def _platform_vector(p: Platform) -> list[Platform]:
    vector = [p]
    if p.architecture == "amd64":
        level = _variant_number(p.variant)
        if level is not None and level > 1:
            vector += [Platform(p.os, "amd64", f"v{v}") for v in range(level - 1, 0, -1)]
        vector.append(Platform(p.os, "386"))
    elif p.architecture == "arm":
        level = _variant_number(p.variant)
        if level is not None and level > 5:
            vector += [Platform(p.os, "arm", f"v{v}") for v in range(level - 1, 4, -1)]
    elif p.architecture == "arm64":
        vector += _platform_vector(Platform(p.os, "arm", p.variant or "v8"))
    return vector


def _variant_number(variant: str) -> int | None:
    try:
        return int(variant.removeprefix("v"))
    except ValueError:
        return None


class ContentStore:
    """Read-only access to one content store directory, with a per-store JSON cache."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._json: dict[str, object | None] = {}

    def blob_path(self, digest: str) -> str | None:
        """Path of the blob for ``digest``; ``None`` when the digest is malformed (so that
        a hostile digest can never name a path outside ``blobs/``)."""
        m = _DIGEST.match(digest)
        if m is None:
            return None
        return os.path.join(self.root, "blobs", m.group(1), m.group(2))

    def read_json(self, digest: str) -> object | None:
        """The decoded JSON document of a blob, ``None`` if missing, too big or not JSON."""
        if digest in self._json:
            return self._json[digest]
        doc: object | None = None
        path = self.blob_path(digest)
        if path is not None:
            try:
                # O_NOFOLLOW: a blob planted as a symlink must not make us read outside the store
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as f:
                    data = f.read(MAX_JSON_BLOB + 1)
                if len(data) <= MAX_JSON_BLOB:
                    doc = json.loads(data)
            except (OSError, ValueError):
                doc = None
        self._json[digest] = doc
        return doc

    def blob_files(self) -> Iterator[tuple[str, int]]:
        """``(digest, st_size)`` of every file under ``blobs/<alg>/``."""
        blobs = os.path.join(self.root, "blobs")
        for alg in _scandir(blobs):
            if not alg.is_dir(follow_symlinks=False):
                continue
            for entry in _scandir(alg.path):
                if entry.is_file(follow_symlinks=False):
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
                    yield f"{alg.name}:{entry.name}", size

    def ingest_dirs(self) -> Iterator[IngestDir]:
        """Every unfinished write under ``ingest/``."""
        for entry in _scandir(os.path.join(self.root, "ingest")):
            if entry.is_dir(follow_symlinks=False):
                yield _read_ingest(entry.path)


@dataclass(frozen=True, slots=True)
class IngestDir:
    """One ``ingest/<hash>/`` directory: ``ref`` is the backend ref ``<ns>/<seq>/<ref>``."""

    path: str
    ref: str | None
    data_bytes: int | None
    total: int | None
    started_at: str | None
    updated_at: str | None


def _read_ingest(path: str) -> IngestDir:
    def text(name: str) -> str | None:
        try:
            with open(os.path.join(path, name), "rb") as f:
                return f.read(1 << 16).decode("utf-8", "surrogateescape")
        except OSError:
            return None

    try:
        data_bytes: int | None = os.stat(os.path.join(path, "data"),
                                         follow_symlinks=False).st_size
    except OSError:
        data_bytes = None
    total_text = text("total")
    total = int(total_text) if total_text and total_text.strip().isdigit() else None
    return IngestDir(path, text("ref"), data_bytes, total, text("startedat"), text("updatedat"))


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def content_root(containerd_root: str) -> str:
    return os.path.join(containerd_root, schema.CONTENT_PLUGIN_DIR)


# -- image walks ---------------------------------------------------------------------------

Available = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class SizeResult:
    size: int
    complete: bool


class ImageWalker:
    """The content-tree walks behind ``ctr images ls`` for one namespace."""

    def __init__(self, store: ContentStore, available: Available, host: HostPlatform) -> None:
        self.store = store
        self.available = available
        self.host = host

    def _document(self, desc: Descriptor) -> dict[str, object] | None:
        if not self.available(desc.digest):
            return None
        doc = self.store.read_json(desc.digest)
        return doc if isinstance(doc, dict) else None

    def children(self, desc: Descriptor) -> list[Descriptor] | None:
        """containerd's ``images.Children``; ``None`` when a needed blob cannot be read."""
        if desc.media_type in MANIFEST_TYPES:
            doc = self._document(desc)
            if doc is None or not _valid_for(doc, manifest=True):
                return None
            config = _descriptor(doc.get("config"))
            layers = _descriptors(doc.get("layers"))
            if config is None or layers is None:
                return None
            return [config, *layers]
        if desc.media_type in INDEX_TYPES:
            doc = self._document(desc)
            if doc is None or not _valid_for(doc, manifest=False):
                return None
            return _descriptors(doc.get("manifests"))
        return []

    def size(self, target: Descriptor) -> SizeResult:
        """``ctr images ls`` SIZE: descriptor sizes of the target, the host platform's best
        manifest (one only), its config and layers."""
        total = 0

        def walk(descs: list[Descriptor]) -> bool:
            nonlocal total
            for desc in descs:
                if desc.size < 0:
                    return False
                total += desc.size
                kids = self.children(desc)
                if kids is None:
                    return False
                kids = [k for k in kids if k.platform is None or self.host.rank(k.platform)
                        is not None]
                if desc.media_type in INDEX_TYPES:
                    if not kids:
                        return False
                    kids = sorted(kids, key=self._preference)[:1]
                if kids and not walk(kids):
                    return False
            return True

        complete = walk([target])
        return SizeResult(total, complete)

    def _preference(self, desc: Descriptor) -> int:
        # Stable sort key equivalent to LimitManifests' Less: ranked platforms first, in
        # matcher order; descriptors without a platform last.
        if desc.platform is None:
            return len(self.host.vector) + 1
        rank = self.host.rank(desc.platform)
        return len(self.host.vector) if rank is None else rank

    def platforms(self, target: Descriptor) -> tuple[tuple[str, ...], bool]:
        """``ctr images ls`` PLATFORMS (sorted, unique) and whether the walk completed."""
        found: set[str] = set()

        def walk(descs: list[Descriptor]) -> bool:
            for desc in descs:
                if desc.platform is not None:
                    found.add(desc.platform.format())
                    continue
                if desc.media_type in CONFIG_TYPES:
                    doc = self._document(desc)
                    if doc is None:
                        return False
                    os_name, arch = doc.get("os"), doc.get("architecture")
                    found.add(Platform(os_name if isinstance(os_name, str) else "",
                                       arch if isinstance(arch, str) else "")
                              .normalized().format())
                    continue
                kids = self.children(desc)
                if kids is None:
                    return False
                if kids and not walk(kids):
                    return False
            return True

        complete = walk([target])
        return tuple(sorted(found)), complete

    def config(self, target: Descriptor) -> Descriptor | None:
        """The config descriptor of the manifest the host platform would run."""
        desc = target
        for _ in range(8):  # index -> (nested index ->) manifest -> config
            if desc.media_type in CONFIG_TYPES:
                return desc
            kids = self.children(desc)
            if not kids:
                return None
            if desc.media_type in MANIFEST_TYPES:
                return kids[0]
            kids = [k for k in kids if k.platform is None or self.host.rank(k.platform)
                    is not None]
            if not kids:
                return None
            desc = sorted(kids, key=self._preference)[0]
        return None


def _valid_for(doc: dict[str, object], *, manifest: bool) -> bool:
    # containerd's validateMediaType: refuse schema 1 and a manifest/index mix-up.
    if doc.get("fsLayers"):
        return False
    media = doc.get("mediaType")
    if manifest:
        return not doc.get("manifests") and media not in INDEX_TYPES
    return not doc.get("config") and not doc.get("layers") and media not in MANIFEST_TYPES


def _descriptors(value: object) -> list[Descriptor] | None:
    if value is None:
        return []
    if not isinstance(value, list):
        return None
    out: list[Descriptor] = []
    for item in value:
        desc = _descriptor(item)
        if desc is None:
            return None
        out.append(desc)
    return out


def _descriptor(value: object) -> Descriptor | None:
    if not isinstance(value, dict):
        return None
    media, digest, size = value.get("mediaType", ""), value.get("digest", ""), value.get("size", 0)
    if not isinstance(media, str) or not isinstance(digest, str):
        return None
    if not isinstance(size, int) or isinstance(size, bool):
        return None
    plat = value.get("platform")
    platform = None
    if isinstance(plat, dict):
        platform = Platform(*(str(plat.get(k) or "") for k in ("os", "architecture", "variant")))
    return Descriptor(media, digest, size, platform)
