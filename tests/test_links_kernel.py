"""The kernel is the oracle: crifs's broken links equal what a running container cannot resolve.

The catalogue image of ``test_links_cli.py`` (plus a static busybox as the shell) is run in a
real containerd (``ctr run --rm``) and a real podman. Inside, busybox lists every symlink on the
container's root filesystem (``find / -xdev -type l``: /proc, /sys, /dev and the /run tmpfs are
other filesystems) and ``stat -L`` says whether it resolves. crifs then audits the same image
offline in the same store, and:

- the set of symlinks crifs sees equals the set the container has (whiteouts, opaque dirs and
  replaced directories applied alike);
- crifs's non-ok links equal the links the kernel cannot resolve, except the verdicts that by
  definition depend on the runtime: ``runtime_provided`` (a runtime mounts /proc, /dev, ...)
  and ``host_only`` (an absolute target that exists on the audit host, not in the image);
- a ``host_only`` link does not resolve in the container either; ``/etc/mtab`` and
  ``/data/devnull`` (``runtime_provided``) do.

The same holds for a container's rw layer (``container:ID``): a container first deletes and
recreates files and directories, so the kernel writes real overlay whiteouts and an opaque
directory, and crifs must read them as the kernel applies them.

The catalogue's cross-layer tar hard link is left out here: containerd 1.6 cannot unpack it
("link ...: no such file or directory"), which is why crifs reports it.

Names are passed out of the container hex-encoded, so spaces and non-UTF-8 bytes survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ocibuild
from crifs.cli.main import main
from ocibuild import build_layout, busybox_available, layout_to_tar
from runtimes import ContainerdDaemon, Podman
from test_links_cli import EXPECTED, REF, catalogue_layers, raw

pytestmark = pytest.mark.skipif(
    not busybox_available(), reason="needs busybox-static (/bin/busybox) as the container shell"
)

# Per symlink: "<hex of the path bytes> <exit status of stat -L>". od prints the bytes as hex
# pairs; tr joins them. Paths never hold a newline in the catalogue.
LIST_LINKS = r"""
bb=/bin/busybox
$bb find / -xdev -type l | while IFS= read -r p; do
  $bb stat -L "$p" >/dev/null 2>&1
  rc=$?
  hex=$(printf '%s' "$p" | $bb od -An -v -tx1 | $bb tr -d ' \n')
  echo "$hex $rc"
done
echo END
"""

# Run inside a container before LIST_LINKS: the kernel itself writes overlay whiteouts (a 0/0
# character device for a deleted lower file or directory) and an opaque directory (the
# overlay.opaque xattr on a directory made where a lower one was deleted) into the container's
# rw layer, which crifs then reads as `container:ID`.
MUTATE = r"""
bb=/bin/busybox
$bb rm -r /usr/lib
$bb mkdir /usr/lib
$bb touch /usr/lib/later.so
$bb rm '/data/target with space'
$bb ln -s /gone '/data/made in container'
$bb ln -s ../usr/lib/later.so /data/fresh-ok
$bb mkdir /usr/lib64
$bb touch /usr/lib64/ld-crifs-test.so.2
"""
RW_LAYER = 3  # the container's rw layer, on top of the image's three
# path -> (verdict, layer_broken) after MUTATE.
CONTAINER_EXPECTED: dict[bytes, tuple[str, int | None]] = {
    b"/usr/bin/rel-ok": ("hidden_by_opaque", RW_LAYER),
    b"/srv/through": ("hidden_by_opaque", RW_LAYER),
    b"/data/chain40/l0": ("hidden_by_opaque", RW_LAYER),
    b"/usr/bin/later": ("ok", None),
    b"/data/with space": ("hidden_by_whiteout", RW_LAYER),
    b"/data/made in container": ("broken", RW_LAYER),
    b"/data/fresh-ok": ("ok", None),
    b"/lib64": ("ok", None),
    b"/usr/bin/via-lib64": ("ok", None),
}

# Verdicts whose outcome in a container depends on the runtime or the host, not the image.
RUNTIME_DEPENDENT = {"runtime_provided", "host_only"}
RESOLVES_AT_RUNTIME = {b"/etc/mtab", b"/data/devnull"}


def kernel_links(output: str) -> dict[bytes, bool]:
    """Parse the script's output: symlink path -> resolves (``stat -L`` exit 0)."""
    lines = output.strip().splitlines()
    assert lines and lines[-1] == "END", output[-2000:]
    found: dict[bytes, bool] = {}
    for line in lines[:-1]:
        hex_path, status = line.split()
        found[bytes.fromhex(hex_path)] = status == "0"
    return found


def crifs_records(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[bytes, dict]:
    code = main([*argv, "--show-ok", "--fail-on", "never", "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (target,) = json.loads(out)["targets"]
    return {raw(rec, "path"): rec for rec in target["links"]}


def crifs_links(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[bytes, str]:
    return {path: rec["verdict"] for path, rec in crifs_records(capsys, *argv).items()}


def assert_agree(kernel: dict[bytes, bool], verdicts: dict[bytes, str]) -> None:
    """crifs and the kernel agree on which links exist and which are broken."""
    # /run is a tmpfs in the container, so links under it are not the image's to judge.
    image_links = {p for p in verdicts if not p.startswith(b"/run/")}
    assert set(kernel) == image_links, (
        f"only in the container: {sorted(set(kernel) - image_links)}; "
        f"only in crifs: {sorted(image_links - set(kernel))}"
    )
    exempt = {p for p, v in verdicts.items() if v in RUNTIME_DEPENDENT}
    kernel_broken = {p for p, ok in kernel.items() if not ok} - exempt
    crifs_broken = {p for p, v in verdicts.items() if v != "ok"} - exempt
    assert crifs_broken == kernel_broken, (
        f"crifs only: {sorted(crifs_broken - kernel_broken)}; "
        f"kernel only: {sorted(kernel_broken - crifs_broken)}"
    )
    for path, verdict in verdicts.items():
        if verdict == "host_only":
            assert not kernel[path], f"{path!r} is host_only but resolves in the container"
    for path in RESOLVES_AT_RUNTIME:
        assert verdicts[path] == "runtime_provided"
        assert kernel[path], f"{path!r} should resolve in a running container"
    # The oracle exercised the catalogue: every expected link was seen by the kernel.
    assert set(EXPECTED) <= set(kernel)


@pytest.fixture
def catalogue_layout(tmp_path: Path) -> Path:
    dest = tmp_path / "layout"
    build_layout(
        dest, {REF: catalogue_layers(with_busybox=True, cross_layer_hardlink=False)},
        compression="gzip",
    )
    return dest


def top_chain_id(layout: Path) -> str:
    """The ChainID of the image's top layer: containerd's key for its top snapshot."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    return ocibuild.chain_ids(config["rootfs"]["diff_ids"])[-1]


def test_containerd_kernel_agrees_with_crifs(
    containerd: ContainerdDaemon, catalogue_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = layout_to_tar(catalogue_layout, catalogue_layout.parent / "layout.tar")
    containerd.import_image(archive, REF)
    output = containerd.ctr(
        "run", "--rm", REF, "links-oracle", "/bin/busybox", "sh", "-c", LIST_LINKS
    )
    kernel = kernel_links(output)
    verdicts = crifs_links(
        capsys, "--runtime", "containerd", "--config", str(containerd.config_path),
        "-n", "default", "links", f"image:{REF}",
    )
    assert_agree(kernel, verdicts)
    # --all-images finds the same (only) image and the same verdicts.
    code = main(["--config", str(containerd.config_path), "links", "--all-images",
                 "--show-ok", "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 1, err
    (target,) = json.loads(out)["targets"]
    assert target["kind"] == "image" and REF in target["target"]
    assert {raw(rec, "path"): rec["verdict"] for rec in target["links"]} == verdicts
    # The image's top snapshot (its chain ID) is the same stack.
    assert crifs_links(
        capsys, "--config", str(containerd.config_path), "-n", "default",
        "links", f"snapshot:{top_chain_id(catalogue_layout)}",
    ) == verdicts


def test_containerd_container_rw_layer_agrees_with_the_kernel(
    containerd: ContainerdDaemon, catalogue_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = layout_to_tar(catalogue_layout, catalogue_layout.parent / "layout.tar")
    containerd.import_image(archive, REF)
    # Without --rm the container and its rw snapshot stay after the task exits.
    output = containerd.ctr(
        "run", REF, "links-mutated", "/bin/busybox", "sh", "-c", MUTATE + LIST_LINKS
    )
    kernel = kernel_links(output)
    records = crifs_records(
        capsys, "--runtime", "containerd", "--config", str(containerd.config_path),
        "links", "container:links-mutated",
    )
    assert_container_agrees(kernel, records)


def assert_container_agrees(kernel: dict[bytes, bool], records: dict[bytes, dict]) -> None:
    """As ``assert_agree``, and the kernel's own whiteouts and opaque directories in the rw
    layer are read as such: the right verdict, broken by the rw layer."""
    assert_agree(kernel, {path: rec["verdict"] for path, rec in records.items()})
    got = {path: (records[path]["verdict"], records[path]["layer_broken"])
           for path in CONTAINER_EXPECTED}
    assert got == CONTAINER_EXPECTED


def test_podman_kernel_agrees_with_crifs(
    podman: Podman, catalogue_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    podman.pull_layout(catalogue_layout, REF)
    output = podman.run(
        "run", "--rm", "--network", "none", REF, "/bin/busybox", "sh", "-c", LIST_LINKS
    )
    kernel = kernel_links(output)
    store = ("--runtime", "cstorage", "--root", str(podman.root), "--runroot",
             str(podman.runroot))
    verdicts = crifs_links(capsys, *store, "links", f"image:{REF}")
    assert_agree(kernel, verdicts)
    # The image's top layer is the same stack.
    assert main([*store, "images", "ls", "-o", "json"]) == 0
    images = json.loads(capsys.readouterr().out)["images"]
    (top_layer,) = [i["top_layer"] for i in images if REF in i["names"] or i["name"] == REF]
    assert crifs_links(capsys, *store, "links", f"layer:{top_layer}") == verdicts


def test_podman_container_rw_layer_agrees_with_the_kernel(
    podman: Podman, catalogue_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    podman.pull_layout(catalogue_layout, REF)
    output = podman.run(
        "run", "--name", "links-mutated", "--network", "none", REF,
        "/bin/busybox", "sh", "-c", MUTATE + LIST_LINKS,
    )
    kernel = kernel_links(output)
    records = crifs_records(
        capsys, "--runtime", "cstorage", "--root", str(podman.root),
        "--runroot", str(podman.runroot), "links", "container:links-mutated",
    )
    assert_container_agrees(kernel, records)
