"""containers/storage (CRI-O, podman, buildah), overlay driver, read offline.

``open_store`` reads a graphroot's ``layers.json``/``images.json``/``containers.json`` under
the store's read locks and maps them into ``crifs.model``; ``detect`` says whether a root
holds such a store. Submodules: ``paths`` (every on-disk path), ``config`` (storage.conf),
``records`` (the JSON records), ``locks`` (read locks), ``overlay`` (links, lower chains and
the driver's mount options), ``store`` (the ``Store`` implementation).
"""

from crifs.cstorage.config import StorageConfig, load_config
from crifs.cstorage.store import CStorageStore, detect, open_store

__all__ = ["CStorageStore", "StorageConfig", "detect", "load_config", "open_store"]
