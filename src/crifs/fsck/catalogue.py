"""Every finding class ``crifs check`` knows: its code, what it means, and where it is found.

This table is the index: ``module`` names the file whose ``findings()`` emits the class.
Codes are stable; a class is never renumbered or reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from crifs.fsck.findings import Severity

E, W = Severity.ERROR, Severity.WARNING


@dataclass(frozen=True, slots=True)
class FindingClass:
    code: str
    severity: Severity
    title: str
    module: str


CLASSES: tuple[FindingClass, ...] = (
    # containerd
    FindingClass("C1", W, "snapshot dir whose id is in no snapshotter record (orphan, new-*, rm-*)",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C2", E, "snapshotter record whose directory is missing",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C3", W, "snapshotter record no namespace's meta.db names (invisible to ctr)",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C4", E, "meta.db snapshot whose snapshotter record is missing",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C5", E, "parent link to a snapshot that does not exist",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C6", W, "stale children entry (blocks ctr snapshots rm of the parent)",
                 "crifs.fsck.containerd_snapshots"),
    FindingClass("C7", W, "snapshot or lease containerd's GC would collect but has not",
                 "crifs.fsck.containerd_gc"),
    FindingClass("C8", W, "content blob or ingest no image or lease references",
                 "crifs.fsck.containerd_gc"),
    FindingClass("C9", W, "active snapshot no container uses",
                 "crifs.fsck.containerd_snapshots"),
    # containers/storage
    FindingClass("S1", E, "layer with a link file but no overlay/l entry",
                 "crifs.fsck.cstorage_links"),
    FindingClass("S2", E, "dangling overlay/l entry", "crifs.fsck.cstorage_links"),
    FindingClass("S3", E, "layer link file missing or naming another l/ entry",
                 "crifs.fsck.cstorage_links"),
    FindingClass("S4", E, "lower / lower-layers naming a missing link or layer",
                 "crifs.fsck.cstorage_links"),
    FindingClass("S5", E, "layer record without a directory", "crifs.fsck.cstorage_records"),
    FindingClass("S6", W, "directory in overlay/ without a layer record (orphan)",
                 "crifs.fsck.cstorage_records"),
    FindingClass("S7", E, "layer whose parent id is unknown", "crifs.fsck.cstorage_records"),
    FindingClass("S8", E, "image whose layer chain has a missing layer",
                 "crifs.fsck.cstorage_records"),
    FindingClass("S9", E, "container whose layer or image is missing",
                 "crifs.fsck.cstorage_records"),
    FindingClass("S10", W, "incomplete layer (interrupted pull or delete)",
                 "crifs.fsck.cstorage_records"),
    FindingClass("S11", W, "layer no image or container reaches, older than --max-age",
                 "crifs.fsck.cstorage_records"),
    FindingClass("S12", E, "overlay/l is not a plain directory", "crifs.fsck.cstorage_links"),
    FindingClass("S13", W, "stale mount record (mountpoints.json counts a mount that is gone)",
                 "crifs.fsck.cstorage_records"),
    # both
    FindingClass("R1", E, "storage root behind a relative or dangling symlink, or wrong owner/mode",
                 "crifs.fsck.roots"),
    FindingClass("R2", E, "storage root on a filesystem the driver cannot use",
                 "crifs.fsck.roots"),
    FindingClass("R3", W, "configured root/state/graphroot/runroot disagrees with the disk",
                 "crifs.fsck.roots"),
)

BY_CODE: dict[str, FindingClass] = {c.code: c for c in CLASSES}


def severity_of(code: str) -> Severity:
    return BY_CODE[code].severity
