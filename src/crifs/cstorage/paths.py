"""Every on-disk path of a containers/storage store (overlay driver), built in one place.

Layout (graphroot ``G``, runroot ``R``; ``transient_store=true`` moves the marked files to R)::

    G/storage.lock                         store-wide lock (fcntl record lock)
    G/overlay/                             driver home
    G/overlay/<layer id>/diff/             layer contents; the upperdir of an RW layer
    G/overlay/<layer id>/link              26-char name of the layer's l/ link
    G/overlay/<layer id>/lower             "l/<parent link>:l/<grandparent link>:…"
    G/overlay/<layer id>/lower-layers      "<parent id>:<grandparent id>:…" (storage >= 1.63)
    G/overlay/<layer id>/{work,merged,empty}/
    G/overlay/l/<link name>  ->  ../<layer id>/diff
    G/overlay-layers/layers.json, layers.lock, <id>.tar-split.gz
    G/overlay-layers/volatile-layers.json  (R/overlay-layers/ when transient)
    G/overlay-images/images.json, images.lock, <image id>/<big data>
    G/overlay-containers/containers.json
    G/overlay-containers/volatile-containers.json, containers.lock  (R/… when transient)
    R/overlay-layers/mountpoints.json, mountpoints.lock
    R/overlay/<feature>-true|false         the driver's cached feature probes

Nothing here touches the disk: these are names only.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

DRIVER = "overlay"
LINK_DIR = "l"
# Entries of the driver home that are not layers (the driver's ListLayers skips them).
NON_LAYER_ENTRIES = frozenset({LINK_DIR, "staging", "tempdirs"})
_PLAIN_BIG_DATA_KEY = re.compile(r"[a-z0-9.]*")


@dataclass(frozen=True, slots=True)
class StorePaths:
    """Paths of one store. ``graphroot``/``runroot`` are absolute, as the store itself uses them
    (they appear verbatim in the overlay mount options the driver builds)."""

    graphroot: str
    runroot: str
    transient: bool = False
    driver: str = DRIVER

    # -- store-wide --------------------------------------------------------------------------

    @property
    def storage_lock(self) -> str:
        return os.path.join(self.graphroot, "storage.lock")

    @property
    def home(self) -> str:
        """The driver home, ``<graphroot>/overlay``."""
        return os.path.join(self.graphroot, self.driver)

    @property
    def runhome(self) -> str:
        """The driver's run dir (feature-probe cache), ``<runroot>/overlay``."""
        return os.path.join(self.runroot, self.driver)

    @property
    def has_mount_program(self) -> str:
        return os.path.join(self.home, ".has-mount-program")

    # -- layer store -------------------------------------------------------------------------

    @property
    def layers_dir(self) -> str:
        return os.path.join(self.graphroot, f"{self.driver}-layers")

    @property
    def run_layers_dir(self) -> str:
        return os.path.join(self.runroot, f"{self.driver}-layers")

    @property
    def layers_json(self) -> str:
        return os.path.join(self.layers_dir, "layers.json")

    @property
    def volatile_layers_json(self) -> str:
        base = self.run_layers_dir if self.transient else self.layers_dir
        return os.path.join(base, "volatile-layers.json")

    @property
    def layers_lock(self) -> str:
        return os.path.join(self.layers_dir, "layers.lock")

    @property
    def mountpoints_json(self) -> str:
        return os.path.join(self.run_layers_dir, "mountpoints.json")

    @property
    def mountpoints_lock(self) -> str:
        return os.path.join(self.run_layers_dir, "mountpoints.lock")

    def tar_split(self, layer_id: str) -> str:
        return os.path.join(self.layers_dir, f"{layer_id}.tar-split.gz")

    def layer_big_data_dir(self, layer_id: str) -> str:
        """``overlay-layers/<id>/``: the layer's big-data items (absent for most layers)."""
        return os.path.join(self.layers_dir, layer_id)

    # -- image store -------------------------------------------------------------------------

    @property
    def images_dir(self) -> str:
        return os.path.join(self.graphroot, f"{self.driver}-images")

    @property
    def images_json(self) -> str:
        return os.path.join(self.images_dir, "images.json")

    @property
    def images_lock(self) -> str:
        return os.path.join(self.images_dir, "images.lock")

    def image_dir(self, image_id: str) -> str:
        """``overlay-images/<id>/``: the image's big-data items (manifest, config, ...)."""
        return os.path.join(self.images_dir, image_id)

    def image_big_data(self, image_id: str, key: str) -> str:
        return os.path.join(self.images_dir, image_id, big_data_file_name(key))

    # -- container store ---------------------------------------------------------------------

    @property
    def containers_dir(self) -> str:
        return os.path.join(self.graphroot, f"{self.driver}-containers")

    @property
    def run_containers_dir(self) -> str:
        return os.path.join(self.runroot, f"{self.driver}-containers")

    @property
    def containers_json(self) -> str:
        return os.path.join(self.containers_dir, "containers.json")

    @property
    def volatile_containers_json(self) -> str:
        base = self.run_containers_dir if self.transient else self.containers_dir
        return os.path.join(base, "volatile-containers.json")

    @property
    def containers_lock(self) -> str:
        base = self.run_containers_dir if self.transient else self.containers_dir
        return os.path.join(base, "containers.lock")

    # -- driver (per layer) ------------------------------------------------------------------

    @property
    def link_dir(self) -> str:
        return os.path.join(self.home, LINK_DIR)

    def link(self, name: str) -> str:
        """``<home>/l/<name>``: the symlink path the driver puts into lowerdir (unresolved)."""
        return os.path.join(self.link_dir, name)

    def layer_dir(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id)

    def layer_diff(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "diff")

    def layer_extra_diff(self, layer_id: str, number: int) -> str:
        """``diff1``…``diffN``: extra lower dirs some layers carry after ``diff``."""
        return os.path.join(self.home, layer_id, f"diff{number}")

    def layer_work(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "work")

    def layer_merged(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "merged")

    def layer_empty(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "empty")

    def layer_link_file(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "link")

    def layer_lower_file(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "lower")

    def layer_lower_layers_file(self, layer_id: str) -> str:
        return os.path.join(self.home, layer_id, "lower-layers")

    def feature_record(self, feature: str, supported: bool) -> str:
        """The driver's cached probe result file, e.g. ``<runroot>/overlay/metacopy()-false``."""
        return os.path.join(self.runhome, f"{feature}-{'true' if supported else 'false'}")


def additional_store_home(store_root: str, driver: str = DRIVER) -> str:
    """The driver home of an additional (read-only) image store."""
    return os.path.join(store_root, driver)


def big_data_file_name(key: str) -> str:
    """File name of a big-data item: keys made only of ``[a-z0-9.]`` are used as they are,
    any other key becomes ``"=" + base64(key)`` (containers/storage ``makeBigDataBaseName``)."""
    if _PLAIN_BIG_DATA_KEY.fullmatch(key):
        return key
    return "=" + base64.b64encode(key.encode("utf-8")).decode("ascii")


def is_safe_component(name: str) -> bool:
    """True when ``name`` can be joined as one path component without leaving its directory."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name
