"""Images held in files: an OCI image layout directory, an OCI archive (a tar of a layout) and
a ``docker save`` tar (or that tar unpacked into a directory).

Formats (image-spec ``image-layout.md``, moby ``image/tarexport``):

- OCI layout: ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (an image
  index whose descriptors point at manifests or nested indexes, named by the
  ``org.opencontainers.image.ref.name`` annotation, or ``io.containerd.image.name`` as
  containerd and docker write it) and ``blobs/<alg>/<encoded>``.
- docker save: ``manifest.json``, a list of ``{"Config", "RepoTags", "Layers"}`` whose paths are
  members of the tar: ``<id>/layer.tar`` (docker < 25, possibly a symlink to another layer's
  member) or ``blobs/sha256/<hex>`` (docker >= 25, which also writes an OCI ``index.json``;
  the OCI view is preferred then).

An archive is never extracted: it is scanned once for member offsets, and each blob is read in
place (small JSON documents whole, layers streamed into ``read_layer_tar``; see
``crifs.oci.sourcefiles``). Only an uncompressed outer tar is supported; its layers may be
compressed.

Platforms: from an index (top level or nested) holding several platform variants of one image,
the variant this host would run is chosen (containerd's preference order), or the first one
when none would run here; ``all_platforms=True`` keeps every variant (attestation manifests
are never images). JSON blobs (manifests, indexes, configs) are checked against their sha256
digest, which is cheap; layers are not (that would mean reading every byte).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from crifs.containerd.content import HostPlatform, Platform
from crifs.errors import BadInput, CorruptStore, NotFound, UnsafePath
from crifs.fs.layer_cache import LayerCache
from crifs.fs.listing import LayerListing
from crifs.oci.sourcefiles import (
    DirFiles,
    SourceFiles,
    TarFiles,
    member_name,
)
from crifs.oci.tarlayer import read_layer_tar

OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
DOCKER_MANIFEST = "manifest.json"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REFERENCE_TYPE = "vnd.docker.reference.type"

KIND_OCI_LAYOUT = "oci-layout"
KIND_OCI_ARCHIVE = "oci-archive"
KIND_DOCKER_ARCHIVE = "docker-archive"
KIND_DOCKER_DIR = "docker-dir"

_MAX_INDEX_DEPTH = 8
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")


class NoImage(BadInput):
    """A directory or uncompressed tar that holds no image index or docker manifest."""


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    """One layer of an image. ``digest`` is the blob digest (docker save < 25: the layer's
    diff_id from the config, when known); ``member`` is where its bytes are, relative to the
    layout root or archive; ``diff_id`` the uncompressed digest the config lists for it."""

    digest: str
    media_type: str
    size: int | None
    member: str
    diff_id: str | None = None


@dataclass(frozen=True, slots=True)
class SourceImage:
    """One image of a source. ``name``: the reference it is stored under (or the manifest
    digest when it has none); ``layers`` bottom first."""

    name: str
    manifest_digest: str | None
    config_digest: str | None
    layers: tuple[LayerDescriptor, ...]
    platform: str | None = None


class ImageSource:
    """An OCI layout dir, an OCI archive, a docker-save tar or an unpacked docker-save dir.

    ``open`` reads the index and every selected image's manifest and config once;
    ``listings`` streams the layers. Nothing is written or extracted.
    """

    def __init__(self, path: str, kind: str, files: SourceFiles, images: list[SourceImage]) -> None:
        self.path = path
        self.kind = kind
        self._files = files
        self._images = images

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, all_platforms: bool = False) -> ImageSource:
        """Detect and read the source at ``path``. Raises ``NotFound`` (no such path),
        ``NoImage`` (a dir or tar that holds no image), ``BadInput`` (not a tar),
        ``CompressedArchive`` (a compressed outer archive) and ``CorruptStore`` naming the file
        for bad JSON or a missing blob."""
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFound("does not exist", path=path) from None
        except OSError as err:
            raise BadInput(f"cannot read: {os.strerror(err.errno or 0)}", path=path) from None
        files: SourceFiles
        if stat.S_ISDIR(st.st_mode):
            files = DirFiles(path)
        elif stat.S_ISREG(st.st_mode):
            files = TarFiles(path)
        else:
            raise BadInput("is neither a directory nor an archive file", path=path)
        is_dir = isinstance(files, DirFiles)
        reader = _Reader(files, HostPlatform(), all_platforms)
        if _is_oci(files):
            kind = KIND_OCI_LAYOUT if is_dir else KIND_OCI_ARCHIVE
            images = reader.oci_images()
        elif _is_docker(files):
            kind = KIND_DOCKER_DIR if is_dir else KIND_DOCKER_ARCHIVE
            images = reader.docker_images()
        else:
            what = "directory" if is_dir else "archive"
            raise NoImage(f"{what} holds no image: no {OCI_LAYOUT}, no {INDEX_JSON} with "
                          f"blobs/, no docker {DOCKER_MANIFEST}", path=path)
        return cls(path, kind, files, images)

    def images(self) -> list[SourceImage]:
        return list(self._images)

    def listings(
        self,
        image: SourceImage,
        progress: Callable[[int, int, int], None] | None = None,
        cache: LayerCache | None = None,
    ) -> list[LayerListing]:
        """The image's layers read into listings, bottom (index 0) first. Each is named
        ``layer <i> <short digest>`` with ``ident`` = the digest; ``CorruptStore`` for a
        missing or unreadable layer. ``progress(position, layers, members)`` is told now and
        then how many members of the layer being read were read. With ``cache``, a layer
        member read for another image of this source is not read again."""
        out: list[LayerListing] = []
        count = len(image.layers)
        with self._files.session():
            for i, layer in enumerate(image.layers):
                told = None if progress is None else partial(progress, i, count)
                name = layer_name(i, layer.digest)
                read = partial(self._read_layer, layer, i, name, told)
                if cache is None:
                    out.append(read())
                else:
                    key = (self.path, layer.member)
                    out.append(cache.listing(key, read, index=i, name=name))
        return out

    def _read_layer(self, layer: LayerDescriptor, index: int, name: str,
                    told: Callable[[int], None] | None) -> LayerListing:
        with self._files.layer(layer.member, f"layer {layer.digest}") as source:
            return read_layer_tar(source, index=index, name=name, ident=layer.digest,
                                  progress=told)

    def __repr__(self) -> str:
        return f"ImageSource({self.path!r}, kind={self.kind!r}, images={len(self._images)})"


def _is_oci(files: SourceFiles) -> bool:
    # index.json alone could be any file at the top of a rootfs; with blobs/ it is a layout.
    return files.exists(OCI_LAYOUT) or (files.exists(INDEX_JSON) and files.has_dir("blobs"))


def _is_docker(files: SourceFiles) -> bool:
    """A docker ``manifest.json``: a JSON list of objects with ``Layers`` (a rootfs may well
    have some other manifest.json at its top)."""
    if not files.exists(DOCKER_MANIFEST):
        return False
    try:
        doc = json.loads(files.read(DOCKER_MANIFEST, DOCKER_MANIFEST))
    except (ValueError, CorruptStore, UnsafePath):
        return False
    return (isinstance(doc, list) and bool(doc)
            and all(isinstance(x, dict) and "Layers" in x for x in doc))


def layer_name(index: int, ident: str) -> str:
    """``layer 2 sha256:0123456789ab…``: the index and a short form of the digest or id."""
    return f"layer {index} {short_ident(ident)}"


def short_ident(ident: str) -> str:
    """A digest or 64-hex id cut to 12 hex digits (docker's short ids); anything else as is."""
    alg, sep, encoded = ident.partition(":")
    if sep and len(encoded) > 12 and _DIGEST.match(ident):
        return f"{alg}:{encoded[:12]}…"
    if not sep and len(ident) == 64 and all(c in "0123456789abcdef" for c in ident):
        return ident[:12] + "…"
    return ident


# -- reading the documents ---------------------------------------------------------------------


class _Reader:
    def __init__(self, files: SourceFiles, host: HostPlatform, all_platforms: bool) -> None:
        self.files = files
        self.host = host
        self.all_platforms = all_platforms

    def json(self, member: str, what: str, digest: str | None = None) -> Any:
        data = self.files.read(member, what)
        if (digest is not None and digest.startswith("sha256:")
                and hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:")):
            raise CorruptStore(f"{what} does not match its digest",
                                   path=self.files.where(member))
        try:
            return json.loads(data)
        except ValueError as err:
            raise CorruptStore(f"{what} is not valid JSON: {err}",
                               path=self.files.where(member)) from None

    def blobmember_name(self, digest: str, referrer: str) -> str:
        m = _DIGEST.match(digest)
        if m is None:
            raise CorruptStore(f"{referrer} names a malformed digest {digest!r}",
                               path=self.files.where(INDEX_JSON))
        return f"blobs/{m.group(1)}/{m.group(2)}"

    # -- OCI -----------------------------------------------------------------------------------

    def oci_images(self) -> list[SourceImage]:
        index = self.json(INDEX_JSON, INDEX_JSON)
        where = self.files.where(INDEX_JSON)
        manifests = _field(index, "manifests", list, INDEX_JSON, where)
        groups: dict[str, list[dict[str, Any]]] = {}
        for i, item in enumerate(manifests):
            desc = _descriptor(item, f"{INDEX_JSON} manifests[{i}]", where)
            groups.setdefault(_ref_name(desc) or desc["digest"], []).append(desc)
        images: list[SourceImage] = []
        for name, descs in groups.items():
            variants = self._pick(name, descs, depth=0)
            if len(variants) > 1:  # platform variants of one name (all_platforms)
                variants = [_with_platform_suffix(image) for image in variants]
            images += variants
        return images

    def _pick(self, name: str, descs: list[dict[str, Any]], depth: int) -> list[SourceImage]:
        """Images from sibling descriptors of one name: expand indexes, choose platforms."""
        if depth > _MAX_INDEX_DEPTH:
            raise CorruptStore(f"image {name}: indexes nested too deep",
                               path=self.files.where(INDEX_JSON))
        candidates = [d for d in descs if not _is_attestation(d)]
        if not self.all_platforms and len(candidates) > 1:
            candidates = [self._preferred(candidates)]
        images: list[SourceImage] = []
        for desc in candidates:
            digest = desc["digest"]
            member = self.blobmember_name(digest, f"image {name}")
            what = f"blob {digest}"
            media = desc.get("mediaType", "")
            doc = self.json(member, what, digest)
            if not isinstance(doc, dict):
                raise CorruptStore(f"{what} is not a JSON object", path=self.files.where(member))
            if media in _INDEX_TYPES or (media not in _MANIFEST_TYPES and "manifests" in doc):
                where = self.files.where(member)
                children = [_descriptor(c, f"{what} manifests[{i}]", where)
                            for i, c in enumerate(_field(doc, "manifests", list, what, where))]
                images += self._pick(name, children, depth + 1)
            else:
                images.append(self._oci_image(name, desc, member, doc))
        return images

    def _preferred(self, descs: list[dict[str, Any]]) -> dict[str, Any]:
        def rank(desc: dict[str, Any]) -> int:
            platform = _platform(desc.get("platform"))
            found = self.host.rank(platform) if platform is not None else None
            return len(self.host.vector) if found is None else found

        return sorted(descs, key=rank)[0]

    def _oci_image(self, name: str, desc: dict[str, Any], member: str,
                   manifest: dict[str, Any]) -> SourceImage:
        what = f"manifest {desc['digest']}"
        where = self.files.where(member)
        config = _descriptor(manifest.get("config"), f"{what} config", where)
        layers = [_descriptor(x, f"{what} layers[{i}]", where)
                  for i, x in enumerate(_field(manifest, "layers", list, what, where))]
        config_member = self.blobmember_name(config["digest"], what)
        config_doc = self.json(config_member, f"config {config['digest']}", config["digest"])
        diff_ids = _diff_ids(config_doc)
        platform = _platform(desc.get("platform")) or _platform(config_doc)
        return SourceImage(
            name=name,
            manifest_digest=desc["digest"],
            config_digest=config["digest"],
            layers=tuple(
                LayerDescriptor(
                    digest=layer["digest"],
                    media_type=layer.get("mediaType", ""),
                    size=layer.get("size"),
                    member=self.blobmember_name(layer["digest"], what),
                    diff_id=diff_ids[i] if diff_ids and len(diff_ids) == len(layers) else None,
                )
                for i, layer in enumerate(layers)
            ),
            platform=platform.format() if platform is not None else None,
        )

    # -- docker save ---------------------------------------------------------------------------

    def docker_images(self) -> list[SourceImage]:
        where = self.files.where(DOCKER_MANIFEST)
        doc = self.json(DOCKER_MANIFEST, DOCKER_MANIFEST)
        if not isinstance(doc, list):
            raise CorruptStore("is not a JSON list of images", path=where)
        images: list[SourceImage] = []
        for i, item in enumerate(doc):
            what = f"{DOCKER_MANIFEST} entry {i + 1}"
            if not isinstance(item, dict):
                raise CorruptStore(f"{what} is not an object", path=where)
            config_ref = _field(item, "Config", str, what, where)
            layer_refs = _field(item, "Layers", list, what, where)
            tags = item.get("RepoTags") or []
            config_member = member_name(config_ref, what, where)
            config_doc = self.json(config_member, f"config {config_ref}")
            diff_ids = _diff_ids(config_doc)
            if diff_ids is not None and len(diff_ids) != len(layer_refs):
                diff_ids = None
            layers: list[LayerDescriptor] = []
            for j, ref in enumerate(layer_refs):
                if not isinstance(ref, str):
                    raise CorruptStore(f"{what} Layers[{j}] is not a string", path=where)
                member = member_name(ref, what, where)
                diff_id = diff_ids[j] if diff_ids else None
                digest = diff_id or _digest_of_blobmember_name(member) or member
                layers.append(LayerDescriptor(digest, "", None, member, diff_id))
            config_digest = _digest_of_blobmember_name(config_member) or (
                "sha256:" + config_member.removesuffix(".json")
                if re.fullmatch(r"[0-9a-f]{64}\.json", config_member) else None)
            name = next((t for t in tags if isinstance(t, str)), None)
            platform = _platform(config_doc)
            images.append(SourceImage(
                name=name or config_digest or config_member,
                manifest_digest=None,
                config_digest=config_digest,
                layers=tuple(layers),
                platform=platform.format() if platform is not None else None,
            ))
        return images


def _field(doc: Any, key: str, typ: type, what: str, where: str) -> Any:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, typ):
        raise CorruptStore(f"{what}: {key!r} is missing or not a {typ.__name__}", path=where)
    return value


def _descriptor(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptStore(f"{what} is not a descriptor object", path=where)
    digest = value.get("digest")
    if not isinstance(digest, str) or _DIGEST.match(digest) is None:
        raise CorruptStore(f"{what} has no valid digest", path=where)
    return value


def _ref_name(desc: dict[str, Any]) -> str | None:
    annotations = desc.get("annotations")
    if not isinstance(annotations, dict):
        return None
    for key in (ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME):
        value = annotations.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _is_attestation(desc: dict[str, Any]) -> bool:
    annotations = desc.get("annotations")
    return isinstance(annotations, dict) and annotations.get(ANNOTATION_REFERENCE_TYPE) == (
        "attestation-manifest")


def _platform(value: Any) -> Platform | None:
    if not isinstance(value, dict):
        return None
    os_name, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return None
    variant = value.get("variant")
    return Platform(os_name, arch, variant if isinstance(variant, str) else "").normalized()


def _with_platform_suffix(image: SourceImage) -> SourceImage:
    if not image.platform:
        return image
    return SourceImage(f"{image.name} [{image.platform}]", image.manifest_digest,
                       image.config_digest, image.layers, image.platform)


def _diff_ids(config: Any) -> list[str] | None:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(ids, list) and all(isinstance(x, str) for x in ids):
        return ids
    return None


def _digest_of_blobmember_name(member: str) -> str | None:
    parts = member.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and _DIGEST.match(f"{parts[1]}:{parts[2]}"):
        return f"{parts[1]}:{parts[2]}"
    return None
