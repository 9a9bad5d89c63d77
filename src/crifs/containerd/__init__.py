"""containerd's on-disk store (``meta.db``, snapshotter DBs, content store), read offline.

``open_store`` returns a :class:`ContainerdStore` implementing ``crifs.model.Store``;
``detect`` tells whether a root (or the configured/default one) holds a containerd store.
They are loaded on first use, so importing a submodule (``crifs.containerd.content``) does
not load the whole backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore, detect, open_store

__all__ = ["ContainerdStore", "detect", "open_store"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crifs.containerd import store

        return getattr(store, name)
    raise AttributeError(name)
