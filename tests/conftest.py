"""Shared fixtures: private real runtimes (containerd, podman) under per-test temp dirs.

Tests using ``containerd`` or ``podman`` are marked with the matching marker automatically and
skip with a clear reason when not root, when the packages are missing or when overlayfs is not
available. Each test gets its own daemon/store, so tests stay independent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtimes import (  # noqa: E402 - the tests dir is put on sys.path just above
    CONTAINERD_TOOLS,
    PODMAN_TOOLS,
    ContainerdDaemon,
    Podman,
    missing_prerequisites,
)

_FIXTURE_MARKERS = {"containerd": "containerd", "podman": "podman"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a runtime fixture, so `-m 'not containerd'` deselects it."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in fixtures and not item.get_closest_marker(marker):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, append the daemon log tail of the test's containerd to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    daemon = getattr(item, "funcargs", {}).get("containerd")
    if isinstance(daemon, ContainerdDaemon):
        report.sections.append(("containerd log", daemon.log_tail()))


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdDaemon]:
    """A fresh, started containerd under its own temp dir; stopped and unmounted at teardown."""
    reason = missing_prerequisites(CONTAINERD_TOOLS)
    if reason:
        pytest.skip(f"containerd tests: {reason}")
    daemon = ContainerdDaemon(tmp_path_factory.mktemp("containerd"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman on a fresh private --root/--runroot; containers removed and unmounted after."""
    reason = missing_prerequisites(PODMAN_TOOLS)
    if reason:
        pytest.skip(f"podman tests: {reason}")
    instance = Podman(tmp_path_factory.mktemp("podman"))
    try:
        yield instance
    finally:
        instance.cleanup()
