"""Private, throw-away instances of the real container runtimes for tests and benchmarks.

Every instance keeps all of its state under one base directory that the caller owns (a pytest
tmp dir or a ``tempfile.mkdtemp``): nothing is written to the host's ``/var/lib/containerd``,
``/run/containerd`` state or ``/var/lib/containers/storage``.

Contract of :class:`ContainerdDaemon`: ``start()`` returns only once the daemon answers
``ctr version``; ``stop()`` always leaves no process of ours running and nothing mounted under
``base``, even when the daemon died or never came up. The GC scheduler is configured so that a
garbage collection only runs on an explicit ``--sync`` request, which lets tests plant faults
and find them still there.

This module is imported by ``tests/conftest.py`` and by ``bench/``; it must not import pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CONTAINERD_TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
PODMAN_TOOLS = ("podman", "conmon", "runc")

# runc cannot raise the default RLIMIT_NOFILE/NPROC on the CI VMs; pass these to `podman run`.
PODMAN_RUN_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")

_START_TIMEOUT_S = 20.0
_STOP_GRACE_S = 10.0
_LOG_TAIL_LINES = 40


class RuntimeCommandError(RuntimeError):
    """A runtime CLI call exited non-zero; the message carries the command and its stderr."""


def missing_prerequisites(tools: Sequence[str]) -> str | None:
    """Why the real runtimes cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (runtimes mount overlayfs)"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing executables: {', '.join(missing)}"
    if not _overlayfs_available():
        return "overlayfs is not available in this kernel"
    return None


def _overlayfs_available() -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as filesystems:
            if any(line.split()[-1:] == ["overlay"] for line in filesystems):
                return True
    except OSError:
        return False
    # The module may simply not be loaded yet.
    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


def _run(argv: Sequence[str], *, check: bool, input: bytes | None = None,
         env: dict[str, str] | None = None, timeout: float = 300.0) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, env=env, timeout=timeout)
    stdout = proc.stdout.decode("utf-8", "surrogateescape")
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeCommandError(
            f"{' '.join(argv)} exited {proc.returncode}: {stderr or '(no stderr)'}"
        )
    return stdout


def unmount_under(base: Path) -> list[str]:
    """Lazily unmount every mount point at or below ``base``, deepest first.

    Returns the mount points it tried to unmount. Errors are ignored: this is cleanup.
    """
    base_str = os.path.realpath(base)
    points: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            for line in info:
                fields = line.split(" ")
                if len(fields) < 5:
                    continue
                point = _unescape_mountinfo(fields[4])
                if point == base_str or point.startswith(base_str + "/"):
                    points.append(point)
    except OSError:
        return []
    # Deepest first so a parent mount is never busy because of a child mount.
    points.sort(key=lambda p: p.count("/"), reverse=True)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)
    return points


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def containerd_config(base: Path) -> str:
    """config.toml text for a daemon whose root, state, socket and opt dir are under ``base``."""
    return f"""\
version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"

[grpc]
  address = "{base / 'containerd.sock'}"

[ttrpc]
  address = "{base / 'containerd.sock.ttrpc'}"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"

# GC only on explicit --sync requests, so tests own the store contents.
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.02
  deletion_threshold = 1000000
  mutation_threshold = 1000000
  schedule_delay = "0s"
  startup_delay = "0s"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base / 'cni' / 'bin'}"
    conf_dir = "{base / 'cni' / 'conf'}"
"""


class ContainerdDaemon:
    """A real containerd whose root, state, socket, config and log all live under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.socket = self.base / "containerd.sock"
        self.config_path = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(containerd_config(self.base), encoding="utf-8")

    # -- process lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """(Re)start the daemon and wait until ``ctr version`` answers (20 s timeout)."""
        if self._proc is not None:
            self.stop()
        for directory in (self.root, self.state, self.base / "opt"):
            directory.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # own process group: stop() signals the group
            )
        finally:
            log.close()
        self.pid = self._proc.pid
        deadline = time.monotonic() + _START_TIMEOUT_S
        last_error = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self.pid = None
                raise RuntimeCommandError(
                    f"containerd exited {code} during start\n{self.log_tail()}"
                )
            if self.socket.exists():
                proc = subprocess.run(self._ctr_argv("default", "version"), capture_output=True,
                                      timeout=10)
                if proc.returncode == 0:
                    return
                last_error = proc.stderr.decode("utf-8", "replace").strip()
            time.sleep(0.05)
        self.stop()
        raise RuntimeCommandError(
            f"containerd did not answer within {_START_TIMEOUT_S:.0f}s: {last_error}\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop tasks, the daemon's process group and our shims; unmount everything under base."""
        if self._proc is not None and self._proc.poll() is None:
            self._kill_tasks()
            _signal_group(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=_STOP_GRACE_S)
        self._proc = None
        self.pid = None
        # Shims run in their own process groups; they are ours when started for our socket.
        for shim_pid in self._shim_pids():
            _signal_group(shim_pid, signal.SIGKILL)
        unmount_under(self.base)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill_tasks(self) -> None:
        """Best effort: kill and delete running tasks so their shims exit and mounts go away."""
        try:
            namespaces = self.ctr("namespaces", "ls", "-q", check=False).split()
            for namespace in namespaces:
                for task_id in self.ctr("tasks", "ls", "-q", namespace=namespace,
                                        check=False).split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task_id, namespace=namespace,
                             check=False)
                    self.ctr("tasks", "delete", "-f", task_id, namespace=namespace, check=False)
        except (OSError, subprocess.SubprocessError):
            pass

    def _shim_pids(self) -> list[int]:
        marker = str(self.socket).encode()
        pids: list[int] = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and marker in argv:
                pids.append(int(entry.name))
        return pids

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the daemon log, for failure messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no containerd log)"
        # The CRI plugin logs its whole config on one line; keep each line readable.
        tail = [line if len(line) <= 400 else line[:400] + " [...]"
                for line in text.splitlines()[-lines:]]
        return f"--- containerd log tail ({self.log_path}) ---\n" + "\n".join(tail)

    # -- ctr -----------------------------------------------------------------------------------

    def _ctr_argv(self, namespace: str, *args: str) -> list[str]:
        return ["ctr", "-a", str(self.socket), "-n", namespace, *args]

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            input: bytes | None = None) -> str:
        """Run ``ctr -a SOCK -n NS ARGS`` and return its stdout as text.

        Raises RuntimeCommandError (with ctr's stderr and the daemon log tail) on a non-zero
        exit when ``check`` is true.
        """
        try:
            return _run(self._ctr_argv(namespace, *args), check=check, input=input)
        except RuntimeCommandError as error:
            raise RuntimeCommandError(f"{error}\n{self.log_tail(15)}") from None

    def import_image(self, layout_tar: Path, ref: str, namespace: str = "default") -> None:
        """Import a tar of an OCI layout, all platforms, unpacked into the overlayfs snapshotter.

        ``ref`` is ctr's ``--base-name``: a ref.name annotation that is a bare tag becomes
        ``<ref>:<tag>``; a full annotation is kept when it starts with ``<ref>`` followed by
        ``/``, ``:`` or ``@`` and is silently skipped otherwise (ctr's rule). When ``ref``
        itself carries a tag or digest (``example.com/img:v1``), its repository is used as the
        base name and the import fails unless an image named exactly ``ref`` results.
        """
        base_name = _repository_of(ref)
        self.ctr("images", "import", "--all-platforms", "--snapshotter", "overlayfs",
                 "--base-name", base_name, str(layout_tar), namespace=namespace)
        if base_name != ref and ref not in self.ctr("images", "ls", "-q",
                                                     namespace=namespace).split():
            raise RuntimeCommandError(f"ctr images import of {layout_tar} did not create {ref}")

    def __repr__(self) -> str:
        return f"ContainerdDaemon(base={str(self.base)!r}, pid={self.pid})"


def _repository_of(ref: str) -> str:
    """``example.com:5000/a/b:v1`` -> ``example.com:5000/a/b`` (a port is not a tag)."""
    ref = ref.partition("@")[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Podman:
    """podman on a private containers/storage root; every call passes --root and --runroot."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.root = self.base / "root"
        self.runroot = self.base / "runroot"
        self.tmpdir = self.base / "tmp"
        self.storage_conf = self.base / "storage.conf"
        self.containers_conf = self.base / "containers.conf"
        for directory in (self.root, self.runroot, self.tmpdir):
            directory.mkdir(parents=True, exist_ok=True)
        # Private config files, so host /etc/containers settings cannot leak into tests.
        self.storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root}"\n'
            f'runroot = "{self.runroot}"\n',
            encoding="utf-8",
        )
        self.containers_conf.write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{self.tmpdir}"\n'
            f'volume_path = "{self.root / "volumes"}"\n'
            '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            'netns = "none"\n',
            encoding="utf-8",
        )

    def base_argv(self) -> list[str]:
        return [
            "podman",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--storage-driver", "overlay",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--tmpdir", str(self.tmpdir),
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        return env

    def run(self, *args: str, check: bool = True) -> str:
        """Run ``podman <private-store flags> ARGS``; return stdout, raise on failure if check."""
        return _run([*self.base_argv(), *args], check=check, env=self.env())

    def pull_layout(self, layout_dir: Path, tag: str) -> None:
        """Pull image ``tag`` from the OCI layout directory (``podman pull oci:DIR:TAG``).

        The image is then named ``tag`` (podman's normalisation: a bare name gets
        ``localhost/``). podman 4.3 itself names an oci: pull after the layout *path*
        (``localhost/<dir>:latest``) and ignores the ref name; that name is removed again.
        """
        image_id = self.run("pull", "-q", f"oci:{layout_dir}:{tag}").split()[-1]
        self.run("tag", image_id, tag)
        path_name = "localhost" + str(Path(layout_dir).resolve()).lower()
        for name in self._image_names(image_id):
            if name.lower().rpartition(":")[0] == path_name:
                self.run("untag", image_id, name)

    def _image_names(self, image_id: str) -> list[str]:
        inspected = json.loads(self.run("image", "inspect", image_id))
        return list(inspected[0].get("RepoTags") or [])

    def cleanup(self) -> None:
        """Remove containers (stops their conmon/runc) and unmount everything under base."""
        self.run("rm", "-af", "-t", "0", check=False)
        unmount_under(self.base)

    def __repr__(self) -> str:
        return f"Podman(root={str(self.root)!r})"
