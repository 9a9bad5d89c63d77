"""containerd's on-disk store (``meta.db``, snapshotter DBs, content store), read offline.

``open_store`` returns a :class:`ContainerdStore` implementing ``crifs.model.Store``;
``detect`` tells whether a root (or the configured/default one) holds a containerd store.
"""

from crifs.containerd.store import ContainerdStore, detect, open_store

__all__ = ["ContainerdStore", "detect", "open_store"]
