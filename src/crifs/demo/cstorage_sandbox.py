"""Write a containers/storage graphroot (overlay driver) the way podman would, without podman.

Layer ids follow c/image pulls (base: the diffID hex; above: sha256 of ``parentID+diffIDhex``),
each layer dir has ``diff/``, ``link``, ``lower``, ``work/``, ``merged/`` and an ``l/`` link,
and the JSON records carry the fields podman writes. One container ``web-1`` runs ``web``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path

from crifs.demo.faults import plant_cstorage_faults
from crifs.demo.images import BuiltImage, DemoFile, extract

CREATED = "2026-11-01T12:00:00Z"
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class _Graph:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.overlay = root / "overlay"
        (self.overlay / "l").mkdir(parents=True, exist_ok=True)
        self.layers: list[dict[str, object]] = []
        self.links: dict[str, str] = {}
        self.rng = random.Random(7)  # stable link names across demo runs

    def add_layer(
        self,
        layer_id: str,
        parent: str | None,
        files: list[DemoFile],
        diff_digest: str | None = None,
        diff_size: int | None = None,
    ) -> None:
        layer_dir = self.overlay / layer_id
        extract(files, layer_dir / "diff")
        for sub in ("work", "merged"):
            (layer_dir / sub).mkdir(mode=0o700)
        if parent is None:
            (layer_dir / "empty").mkdir(mode=0o700)
        link = "".join(self.rng.choice(_LINK_ALPHABET) for _ in range(26))
        (layer_dir / "link").write_text(link)
        (self.overlay / "l" / link).symlink_to(f"../{layer_id}/diff")
        self.links[layer_id] = link
        if parent is not None:
            parent_lower = self.overlay / parent / "lower"
            chain = [f"l/{self.links[parent]}"]
            if parent_lower.exists():
                chain.append(parent_lower.read_text())
            (layer_dir / "lower").write_text(":".join(chain))
        rec: dict[str, object] = {"id": layer_id, "created": CREATED}
        if parent is not None:
            rec["parent"] = parent
        if diff_digest is not None:
            rec.update(
                {
                    "diff-digest": diff_digest,
                    "compressed-diff-digest": diff_digest,
                    "diff-size": diff_size,
                    "compressed-size": diff_size,
                    "compression": 0,
                    "uidset": [0],
                    "gidset": [0],
                }
            )
        self.layers.append(rec)


def _layer_ids(image: BuiltImage) -> list[str]:
    ids: list[str] = []
    for diff_id in image.diff_ids:
        hexpart = diff_id.split(":", 1)[1]
        if not ids:
            ids.append(hexpart)
        else:
            ids.append(hashlib.sha256(f"{ids[-1]}+{hexpart}".encode()).hexdigest())
    return ids


def _big_data_name(key: str) -> str:
    if all(c in "abcdefghijklmnopqrstuvwxyz0123456789." for c in key):
        return key
    return "=" + base64.b64encode(key.encode()).decode()


def build_cstorage_root(root: Path, images: list[BuiltImage], *, faults: bool = False) -> Path:
    """Write a graphroot under ``root``; return it. ``faults`` plants the demo's faults
    (``crifs.demo.faults``)."""
    graph = _Graph(root)
    image_recs: list[dict[str, object]] = []
    tops: dict[str, str] = {}
    for image in images:
        assert image.manifest and image.config
        ids = _layer_ids(image)
        for i, (layer_id, files, blob) in enumerate(
            zip(ids, image.layers, image.layer_blobs, strict=True)
        ):
            if not (graph.overlay / layer_id).exists():
                graph.add_layer(
                    layer_id, ids[i - 1] if i else None, files, blob.digest, len(blob.data)
                )
        image_id = image.config.digest.split(":", 1)[1]
        tops[image.name] = ids[-1]
        big = {
            f"manifest-{image.manifest.digest}": image.manifest.data,
            image.config.digest: image.config.data,
            "manifest": image.manifest.data,
        }
        data_dir = root / "overlay-images" / image_id
        data_dir.mkdir(parents=True)
        for key, data in big.items():
            (data_dir / _big_data_name(key)).write_bytes(data)
        image_recs.append(
            {
                "id": image_id,
                "digest": image.manifest.digest,
                "names": [image.name],
                "layer": ids[-1],
                "metadata": "{}",
                "big-data-names": list(big),
                "big-data-sizes": {k: len(v) for k, v in big.items()},
                "big-data-digests": {
                    k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in big.items()
                },
                "created": CREATED,
            }
        )
    web = images[0]
    assert web.config
    container_layer = hashlib.sha256(b"crifs demo container web-1").hexdigest()
    graph.add_layer(
        container_layer,
        tops[web.name],
        [DemoFile("tmp", "dir"), DemoFile("tmp/session", "file", b"state\n")],
    )
    container_id = hashlib.sha256(b"crifs demo web-1").hexdigest()
    containers = [
        {
            "id": container_id,
            "names": ["web-1"],
            "image": web.config.digest.split(":", 1)[1],
            "layer": container_layer,
            "metadata": json.dumps({"image-name": web.name, "name": "web-1"}),
            "created": CREATED,
            "flags": {"MountLabel": "", "ProcessLabel": ""},
        }
    ]
    (root / "overlay-containers" / container_id / "userdata").mkdir(parents=True)
    if faults:
        plant_cstorage_faults(root, graph.layers, graph.links, graph.add_layer)
    for sub, name, recs in (
        ("overlay-layers", "layers.json", graph.layers),
        ("overlay-images", "images.json", image_recs),
        ("overlay-containers", "containers.json", containers),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_text(json.dumps(recs))
        (root / sub / (name.split(".")[0] + ".lock")).touch()
    (root / "storage.lock").touch()
    (root / "userns.lock").touch()
    # The modes containers/storage creates (GetStore, the overlay driver's home).
    root.chmod(0o700)
    (root / "overlay").chmod(0o700)
    return root
