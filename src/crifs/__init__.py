"""crifs: fsck and x-ray for container storage (containerd, CRI-O, podman)."""

from crifs.errors import CrifsError
from crifs.model import Container, Image, Mount, Snapshot, SnapshotKind, Store, StoreInfo, Usage

__version__ = "0.1.0"

__all__ = [
    "Container",
    "CrifsError",
    "Image",
    "Mount",
    "Snapshot",
    "SnapshotKind",
    "Store",
    "StoreInfo",
    "Usage",
    "__version__",
]
