"""A small typed client of a running containerd's gRPC API: what repairs need, as ctr does it.

Requests go over the daemon's unix socket (``[grpc] address``, by default
``/run/containerd/containerd.sock``), each in a namespace given in the gRPC metadata header
``containerd-namespace``, each with a deadline. grpc and the generated modules
(:mod:`crifs.containerd.api`) are imported when a client is made, never when crifs starts.

Contracts:

- Removing something that is already gone (``NotFound``) is success: the method returns
  ``False``, so a plan can be run again. Creating something that exists (``AlreadyExists``)
  is success too and returns ``False``.
- A daemon that does not answer raises :class:`DaemonUnavailable`, whose one line names the
  socket; any other refusal raises :class:`ApiError` (one line: the method, the object and
  containerd's own message; ``code`` is the gRPC status name, e.g. ``FAILED_PRECONDITION``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crifs.containerd.config import DEFAULT_ADDRESS
from crifs.errors import CrifsError
from crifs.repair.actions import ApiCall

if TYPE_CHECKING:
    import grpc

NAMESPACE_HEADER = "containerd-namespace"
LABEL_EXPIRE = "containerd.io/gc.expire"
DEFAULT_TIMEOUT_S = 10.0
# A synchronous lease delete waits for a whole GC pass (mark, sweep, snapshotter Cleanup,
# content GC) over the store: minutes on a big node.
GC_TIMEOUT_S = 600.0
# A lease crifs creates outlives a crash of crifs by at most this long.
LEASE_LIFETIME = dt.timedelta(hours=1)


class DaemonUnavailable(CrifsError):
    """containerd does not answer on its socket (not running, wrong socket, no permission)."""


class ApiError(CrifsError):
    """containerd refused a request; ``code`` is the gRPC status name."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def target_of(address: str) -> str:
    """The gRPC target of a socket given as ``PATH`` or ``unix://PATH``."""
    path = address.removeprefix("unix://")
    return "unix://" + os.path.abspath(path)


def peer_pid(address: str, timeout: float = 2.0) -> int | None:
    """The pid of the process listening on unix socket ``address`` (``SO_PEERCRED``), or
    ``None`` when it cannot be told (nothing listens, or its pid is not visible here)."""
    path = address.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What ``Stat`` says about a snapshot (``kind``: ``View``, ``Active``, ``Committed``)."""

    name: str
    parent: str
    kind: str
    labels: Mapping[str, str]


_KINDS = {0: "Unknown", 1: "View", 2: "Active", 3: "Committed"}


class ContainerdClient:
    """One connection to containerd at ``address`` (a context manager; :meth:`close` ends
    it). ``timeout`` bounds every request except a synchronous lease delete (``gc_timeout``).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = DEFAULT_TIMEOUT_S,
                 gc_timeout: float = GC_TIMEOUT_S) -> None:
        import grpc

        from crifs.containerd.api import (
            content_pb2_grpc,
            leases_pb2_grpc,
            snapshots_pb2_grpc,
            version_pb2_grpc,
        )

        self.address = address
        self.target = target_of(address)
        self.timeout = timeout
        self.gc_timeout = gc_timeout
        self._grpc = grpc
        self._channel = grpc.insecure_channel(self.target)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._version = version_pb2_grpc.VersionStub(self._channel)

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- version -------------------------------------------------------------------------------

    def version(self, timeout: float | None = None) -> tuple[str, str]:
        """``(version, revision)`` of the daemon; the cheapest way to see that it answers."""
        from google.protobuf import empty_pb2

        reply = self._call("Version", self._version.Version, empty_pb2.Empty(), None,
                           "the daemon", timeout=timeout)
        return reply.version, reply.revision

    # -- snapshots -----------------------------------------------------------------------------

    def prepare_snapshot(self, namespace: str, snapshotter: str, key: str, parent: str = "",
                         labels: Mapping[str, str] | None = None) -> bool:
        """Create active snapshot ``key`` on ``parent`` (none: an empty base). ``False`` when
        ``key`` already exists."""
        from crifs.containerd.api import snapshots_pb2

        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        return self._create("Prepare", self._snapshots.Prepare, request, namespace,
                            f"snapshot {key}")

    def remove_snapshot(self, namespace: str, snapshotter: str, key: str) -> bool:
        """Remove snapshot ``key`` (records only; its directory goes at the next GC's
        Cleanup). ``False`` when it was already gone."""
        from crifs.containerd.api import snapshots_pb2

        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        return self._delete("Remove", self._snapshots.Remove, request, namespace,
                            f"snapshot {key}")

    def stat_snapshot(self, namespace: str, snapshotter: str, key: str) -> SnapshotInfo | None:
        """The snapshot's info, or ``None`` when there is no such snapshot."""
        from crifs.containerd.api import snapshots_pb2

        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            reply = self._call("Stat", self._snapshots.Stat, request, namespace,
                               f"snapshot {key}")
        except ApiError as err:
            if err.code == "NOT_FOUND":
                return None
            raise
        info = reply.info
        return SnapshotInfo(info.name, info.parent, _KINDS.get(info.kind, "Unknown"),
                            dict(info.labels))

    # -- leases --------------------------------------------------------------------------------

    def create_lease(self, namespace: str, lease_id: str,
                     expires: dt.timedelta | None = LEASE_LIFETIME) -> bool:
        """Create lease ``lease_id``, expiring after ``expires`` (``None``: never), as
        ``ctr leases create --id`` does. ``False`` when it already exists."""
        from crifs.containerd.api import leases_pb2

        labels = {}
        if expires is not None:
            until = dt.datetime.now(dt.UTC) + expires
            labels[LABEL_EXPIRE] = until.strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(id=lease_id, labels=labels)
        return self._create("Create", self._leases.Create, request, namespace,
                            f"lease {lease_id}")

    def delete_lease(self, namespace: str, lease_id: str, *, sync: bool = False) -> bool:
        """Delete lease ``lease_id``; with ``sync`` containerd runs its garbage collection
        (snapshotter Cleanup and content GC included) before answering. ``False`` when the
        lease was already gone (then no GC ran)."""
        from crifs.containerd.api import leases_pb2

        request = leases_pb2.DeleteRequest(id=lease_id, sync=sync)
        return self._delete("Delete", self._leases.Delete, request, namespace,
                            f"lease {lease_id}", timeout=self.gc_timeout if sync else None)

    def list_leases(self, namespace: str) -> list[str]:
        """The ids of the namespace's leases."""
        from crifs.containerd.api import leases_pb2

        reply = self._call("List", self._leases.List, leases_pb2.ListRequest(), namespace,
                           "leases")
        return [lease.id for lease in reply.leases]

    # -- content -------------------------------------------------------------------------------

    def content_info(self, namespace: str, digest: str) -> int | None:
        """The size of blob ``digest`` in the namespace, or ``None`` when it has no record."""
        from crifs.containerd.api import content_pb2

        try:
            reply = self._call("Info", self._content.Info, content_pb2.InfoRequest(digest=digest),
                               namespace, f"blob {digest}")
        except ApiError as err:
            if err.code == "NOT_FOUND":
                return None
            raise
        return int(reply.info.size)

    def delete_content(self, namespace: str, digest: str) -> bool:
        """Delete the namespace's record of blob ``digest`` (the file goes at the next content
        GC when no namespace records it). ``False`` when it had no record."""
        from crifs.containerd.api import content_pb2

        request = content_pb2.DeleteContentRequest(digest=digest)
        return self._delete("Delete", self._content.Delete, request, namespace,
                            f"blob {digest}")

    def write_content(self, namespace: str, ref: str, data: bytes) -> tuple[str, bool]:
        """Store ``data`` as a blob in one committed write under ``ref`` (what
        ``ctr content ingest REF`` does). ``(digest, False)`` when the blob already exists."""
        from crifs.containerd.api import content_pb2

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        request = content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, ref=ref, total=len(data), expected=digest, data=data)

        def requests() -> Iterator[Any]:
            yield request

        def write(stream: Iterator[Any], **kwargs: Any) -> Any:
            return list(self._content.Write(stream, **kwargs))

        made = self._create("Write", write, requests(), namespace, f"blob {digest}")
        return digest, made

    # -- one planned call ----------------------------------------------------------------------

    def run(self, call: ApiCall) -> str:
        """Make the request ``call`` describes; a line saying what happened. ``ApiError`` for
        a call this client does not know (a plan from a newer crifs)."""
        fields = dict(call.fields)
        ns = call.namespace
        what = (call.service, call.method)
        if what == ("snapshots", "Remove"):
            key, ss = fields["key"], fields["snapshotter"]
            done = self.remove_snapshot(ns, ss, key)
            return (f"removed snapshot {key} ({ss}, namespace {ns})" if done else
                    f"snapshot {key} ({ss}, namespace {ns}) already gone")
        if what == ("snapshots", "Prepare"):
            key, ss, parent = fields["key"], fields["snapshotter"], fields.get("parent", "")
            done = self.prepare_snapshot(ns, ss, key, parent)
            on = f" on {parent}" if parent else ""
            return (f"prepared snapshot {key}{on} ({ss}, namespace {ns})" if done else
                    f"snapshot {key} ({ss}, namespace {ns}) already exists")
        if what == ("leases", "Create"):
            lease = fields["id"]
            done = self.create_lease(ns, lease)
            return (f"created lease {lease} (namespace {ns})" if done else
                    f"lease {lease} (namespace {ns}) already exists")
        if what == ("leases", "Delete"):
            lease, sync = fields["id"], fields.get("sync") == "true"
            done = self.delete_lease(ns, lease, sync=sync)
            gc = " and ran containerd's GC" if sync and done else ""
            return (f"deleted lease {lease} (namespace {ns}){gc}" if done else
                    f"lease {lease} (namespace {ns}) already gone")
        if what == ("content", "Delete"):
            digest = fields["digest"]
            done = self.delete_content(ns, digest)
            return (f"deleted the record of blob {digest} (namespace {ns})" if done else
                    f"blob {digest} (namespace {ns}) has no record: already gone")
        if what == ("content", "Write"):
            digest, done = self.write_content(ns, fields["ref"],
                                              fields.get("data", "").encode())
            return (f"wrote blob {digest} (namespace {ns})" if done else
                    f"blob {digest} (namespace {ns}) already exists")
        raise ApiError(f"unknown API call {call.service}.{call.method} (a plan from a newer "
                       "crifs?)", code="UNIMPLEMENTED")

    # -- plumbing ------------------------------------------------------------------------------

    def _create(self, method: str, stub: Any, request: Any, namespace: str, what: str) -> bool:
        try:
            self._call(method, stub, request, namespace, what)
        except ApiError as err:
            if err.code == "ALREADY_EXISTS":
                return False
            raise
        return True

    def _delete(self, method: str, stub: Any, request: Any, namespace: str, what: str,
                timeout: float | None = None) -> bool:
        try:
            self._call(method, stub, request, namespace, what, timeout=timeout)
        except ApiError as err:
            if err.code == "NOT_FOUND":
                return False
            raise
        return True

    def _call(self, method: str, stub: Any, request: Any, namespace: str | None, what: str,
              *, timeout: float | None = None) -> Any:
        metadata = ((NAMESPACE_HEADER, namespace),) if namespace else None
        try:
            return stub(request, metadata=metadata, timeout=timeout or self.timeout)
        except self._grpc.RpcError as err:
            raise self._error(err, method, what, timeout or self.timeout) from None

    def _error(self, err: grpc.RpcError, method: str, what: str, timeout: float) -> CrifsError:
        code = err.code() if isinstance(err, self._grpc.Call) else None
        details = _one_line(err.details() if isinstance(err, self._grpc.Call) else str(err))
        status = self._grpc.StatusCode
        if code is status.UNAVAILABLE:
            return DaemonUnavailable(f"containerd does not answer at {self.target}: {details}")
        if code is status.DEADLINE_EXCEEDED:
            return DaemonUnavailable(f"containerd at {self.target} did not answer {method} of "
                                     f"{what} within {timeout:g} s")
        name = code.name if code is not None else "UNKNOWN"
        return ApiError(f"containerd refused {method} of {what}: {details} ({name})", code=name)


def _one_line(text: str | None) -> str:
    lines = (text or "no details").strip().splitlines()
    return lines[0] if lines else "no details"
