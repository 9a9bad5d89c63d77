"""The on-disk schema of containerd's bolt databases, drawn once.

``io.containerd.metadata.v1.bolt/meta.db`` (containerd ``metadata/buckets.go``; dbVersion 3 in
1.6/1.7, 4 in 2.x)::

    v1
    ├── version : varint                 3 = containerd 1.x, 4 = 2.x
    ╘══ <namespace>
        ├── labels ══ <k> : <v>
        ├── images ══ <image name>
        │   ├── createdat, updatedat : Go binary time
        │   ├── target ── digest : str, mediatype : str, size : varint
        │   ├── labels ══ …
        │   └── annotations ══ …
        ├── containers ══ <container id>
        │   ├── createdat, updatedat, image : str, snapshotter : str, snapshotKey : str
        │   ├── spec : proto Any, sandboxid : str
        │   ├── runtime ── name : str, options : proto Any
        │   ├── extensions ══ <name> : proto Any
        │   └── labels ══ …
        ├── snapshots ══ <snapshotter>          (bucket sequence: backend key counter)
        │   ╘══ <user key>
        │       ├── name : str                  backend key "<ns>/<seq>/<key>"
        │       ├── parent : str                the parent's *user* key
        │       ├── createdat, updatedat
        │       ├── children ══ <child key> : <nil>
        │       └── labels ══ …
        ├── content
        │   ├── blob ══ <digest> ── createdat, updatedat, size : varint, labels ══ …
        │   └── ingests ══ <ref> ── ref : str, expireat : time, expected : digest
        ├── leases ══ <lease id>
        │   ├── createdat, labels ══ …
        │   ├── snapshots ══ <snapshotter> ══ <key> : <nil>
        │   ├── content ══ <digest> : <nil>
        │   ├── ingests ══ <ref> : <nil>
        │   └── images ══ <name> : <nil>          (2.x)
        └── sandboxes ══ <id>                    (2.x here; 1.7 at the bolt root as
            ├── createdat, updatedat               <namespace>/sandboxes/<id>)
            ├── spec : proto Any, sandboxer : str
            ├── runtime ── name, options
            ├── extensions ══ …
            └── labels ══ …

Snapshotter ``metadata.db`` (``snapshots/storage/bolt.go``, unchanged in 2.x; overlayfs and
native share it)::

    v1
    ├── snapshots ══ <backend key>          (bucket sequence: numeric id allocator)
    │   ├── id : uvarint                    directory snapshots/<id>
    │   ├── kind : 1 byte                   0 Unknown, 1 View, 2 Active, 3 Committed
    │   ├── parent : str                    the parent's *backend* key
    │   ├── createdat, updatedat
    │   ├── inodes : varint, size : varint  committed only
    │   └── labels ══ …
    └── parents : uvarint(parent id) 0x00 uvarint(child id) -> child backend key

``══`` marks a bucket of buckets (one per name), ``──`` a single sub-bucket.
"""

from __future__ import annotations

# Directories under the containerd root.
METADATA_PLUGIN_DIR = "io.containerd.metadata.v1.bolt"
META_DB = "meta.db"
CONTENT_PLUGIN_DIR = "io.containerd.content.v1.content"
SNAPSHOTTER_DIR_PREFIX = "io.containerd.snapshotter.v1."
SNAPSHOTTER_DB = "metadata.db"

# meta.db
SCHEMA_V1 = b"v1"
DB_VERSION = b"version"
DB_VERSION_1X = 3
DB_VERSION_2X = 4

LABELS = b"labels"
ANNOTATIONS = b"annotations"
IMAGES = b"images"
CONTAINERS = b"containers"
SNAPSHOTS = b"snapshots"
CONTENT = b"content"
BLOB = b"blob"
INGESTS = b"ingests"
LEASES = b"leases"
SANDBOXES = b"sandboxes"

CREATED_AT = b"createdat"
UPDATED_AT = b"updatedat"
EXPIRE_AT = b"expireat"
TARGET = b"target"
DIGEST = b"digest"
MEDIA_TYPE = b"mediatype"
SIZE = b"size"
IMAGE = b"image"
RUNTIME = b"runtime"
NAME = b"name"
OPTIONS = b"options"
SPEC = b"spec"
SNAPSHOTTER = b"snapshotter"
SNAPSHOT_KEY = b"snapshotKey"
SANDBOX_ID = b"sandboxid"
SANDBOXER = b"sandboxer"
EXTENSIONS = b"extensions"
PARENT = b"parent"
CHILDREN = b"children"
REF = b"ref"
EXPECTED = b"expected"

# snapshotter metadata.db (shares SCHEMA_V1, SNAPSHOTS, PARENT, LABELS, SIZE, times)
ID = b"id"
KIND = b"kind"
INODES = b"inodes"
PARENTS = b"parents"

# The snapshotters whose directory layout crifs knows.
OVERLAYFS = "overlayfs"
NATIVE = "native"
SUPPORTED_SNAPSHOTTERS = (OVERLAYFS, NATIVE)


def snapshotter_dir(name: str) -> str:
    """The plugin directory name of snapshotter ``name`` under the containerd root."""
    return SNAPSHOTTER_DIR_PREFIX + name
