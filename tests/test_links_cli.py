"""``crifs links`` from the command line: verdicts, layers, fixes, filters, exit codes, JSON,
YAML, table and SARIF, on OCI layouts, OCI archives and plain rootfs dirs built here.

``CATALOGUE`` is the image of tricky links that ``test_links_kernel.py`` also runs in real
containerd and podman, where the kernel is the oracle; here each expected verdict is spelled
out, with the layer that added the link and the layer that broke it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from crifs.cli.main import main
from ocibuild import Entry, build_layout, busybox_available, busybox_layer, layout_to_tar

SCHEMA_PATH = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"
REF = "example.com/crifs/links:v1"
HOST_ENV = "/usr/bin/env"  # an absolute target every Debian host has and the image lacks

# -- the catalogue -----------------------------------------------------------------------------

_DIRS = [
    "etc", "usr", "usr/bin", "usr/lib", "usr/share", "usr/share/doc", "usr/share/doc/pkg",
    "opt", "opt/app", "opt/app/lib", "data", "data/chain40", "data/chain41", "data/replaced",
    "srv",
]
_FILES: list[str | bytes] = [
    "usr/lib/libc.so.6", "usr/lib/libgone.so", "usr/share/doc/pkg/README",
    "opt/app/lib/libx.so", "data/replaced/x", "data/target with space", b"data/ok\xfetarget",
]


def _chain(directory: str, links: int) -> list[Entry]:
    """``links`` symlinks l0 -> l1 -> ... -> l<links-1> -> the libc file: opening l0 follows
    exactly ``links`` symlinks."""
    entries = [
        Entry(f"{directory}/l{i}", "symlink", target=f"l{i + 1}") for i in range(links - 1)
    ]
    entries.append(Entry(f"{directory}/l{links - 1}", "symlink", target="/usr/lib/libc.so.6"))
    return entries


_BASE_LINKS: list[tuple[str | bytes, str | bytes]] = [
    ("usr/bin/rel-ok", "../lib/libc.so.6"),
    ("usr/bin/abs-ok", "/usr/lib/libc.so.6"),
    ("usr/bin/dotdot-ok", "../../../../../usr/lib/libc.so.6"),
    ("usr/bin/broken-rel", "../lib/missing.so"),
    ("usr/bin/broken-abs", "/nonexistent/file"),
    ("usr/bin/host-env", HOST_ENV),
    ("opt/tool", "lib/libc.so.6"),
    ("usr/bin/gone", "../lib/libgone.so"),
    ("usr/bin/appx", "/opt/app/lib/libx.so"),
    ("usr/bin/removed-link", "/nonexistent"),
    ("usr/bin/later", "../lib/later.so"),
    ("usr/bin/readme", "/usr/share/doc/pkg/README"),
    ("usr/share/doc/pkg/inner", "README"),
    ("data/loop-a", "loop-b"),
    ("data/loop-b", "loop-a"),
    ("data/self", "self"),
    ("data/notdir", "../usr/lib/libc.so.6/foo"),
    ("data/slash", "/usr/lib/libc.so.6/"),
    ("data/lnk-replaced", "replaced/x"),
    ("lib64", "usr/lib64"),
    ("usr/bin/via-lib64", "/lib64/ld-crifs-test.so.2"),  # a name no host has
    ("etc/mtab", "/proc/self/mounts"),
    ("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf"),
    ("data/devnull", "/dev/null"),
    ("data/with space", "target with space"),
    ("data/broken space", "no such thing"),
    (b"data/bad\xffname", b"missing\xfe"),
    (b"data/ok\xfflink", b"ok\xfetarget"),
    ("srv/dir-link", "../usr/lib"),
    ("srv/through", "dir-link/libc.so.6"),
]


def base_layer(with_busybox: bool = False) -> list[Entry]:
    entries = busybox_layer() if with_busybox else []
    entries += [Entry(d, "dir") for d in _DIRS]
    entries += [Entry(f, "file", data=b"x") for f in _FILES]
    entries += [Entry(p, "symlink", target=t) for p, t in _BASE_LINKS]
    entries += _chain("data/chain40", 40) + _chain("data/chain41", 41)
    entries.append(Entry("usr/lib/libc-same.so", "hardlink", target="usr/lib/libc.so.6"))
    return entries


def update_layer(cross_layer_hardlink: bool = True) -> list[Entry]:
    entries = [
        Entry("usr/lib/libgone.so", "whiteout"),
        Entry("opt/app", "dir"),
        Entry("opt/app", "opaque"),
        Entry("opt/app/other", "file", data=b"y"),
        Entry("usr/bin/removed-link", "whiteout"),
        Entry("usr/lib/later.so", "file", data=b"z"),
        Entry("data/replaced", "file", data=b"now a file"),
        Entry("usr/bin/new-broken", "symlink", target="/nope"),
    ]
    if cross_layer_hardlink:
        # containerd 1.6 cannot extract this layer ("link ...: no such file or directory"):
        # the kernel-oracle image leaves it out.
        entries.append(Entry("usr/lib/libc-hard.so", "hardlink", target="usr/lib/libc.so.6"))
    return entries


def cleanup_layer() -> list[Entry]:
    return [Entry("usr/share/doc/pkg", "whiteout")]


def catalogue_layers(
    with_busybox: bool = False, cross_layer_hardlink: bool = True
) -> list[list[Entry]]:
    return [base_layer(with_busybox), update_layer(cross_layer_hardlink), cleanup_layer()]


@dataclass(frozen=True)
class Expected:
    """A verdict with the layer that added the link and the one that broke it. A link that
    never resolved was broken by its own layer; ok and runtime_provided ones by none."""

    verdict: str
    layer_added: int = 0
    layer_broken: int | None = None

    def __post_init__(self) -> None:
        if self.layer_broken is None and self.verdict not in ("ok", "runtime_provided"):
            object.__setattr__(self, "layer_broken", self.layer_added)


# Every symlink of the merged catalogue image and its verdict. Links that a later layer
# deletes (usr/bin/removed-link, usr/share/doc/pkg/inner) are absent: they must not be reported.
EXPECTED: dict[bytes, Expected] = {
    b"/usr/bin/rel-ok": Expected("ok"),
    b"/usr/bin/abs-ok": Expected("ok"),
    b"/usr/bin/dotdot-ok": Expected("ok"),
    b"/usr/bin/broken-rel": Expected("broken"),
    b"/usr/bin/broken-abs": Expected("broken"),
    b"/usr/bin/host-env": Expected("host_only"),
    b"/opt/tool": Expected("broken"),
    b"/usr/bin/gone": Expected("hidden_by_whiteout", 0, 1),
    b"/usr/bin/appx": Expected("hidden_by_opaque", 0, 1),
    b"/usr/bin/later": Expected("ok"),
    b"/usr/bin/readme": Expected("hidden_by_whiteout", 0, 2),
    b"/data/loop-a": Expected("loop"),
    b"/data/loop-b": Expected("loop"),
    b"/data/self": Expected("loop"),
    b"/data/notdir": Expected("not_a_directory"),
    b"/data/slash": Expected("not_a_directory"),
    b"/lib64": Expected("broken"),
    b"/usr/bin/via-lib64": Expected("broken"),
    b"/etc/mtab": Expected("runtime_provided"),
    b"/etc/resolv.conf": Expected("runtime_provided"),
    b"/data/devnull": Expected("runtime_provided"),
    b"/data/with space": Expected("ok"),
    b"/data/broken space": Expected("broken"),
    b"/data/bad\xffname": Expected("broken"),
    b"/data/ok\xfflink": Expected("ok"),
    b"/srv/dir-link": Expected("ok"),
    b"/srv/through": Expected("ok"),
    b"/usr/bin/new-broken": Expected("broken", 1),
    **{f"/data/chain40/l{i}".encode(): Expected("ok") for i in range(40)},
    b"/data/chain41/l0": Expected("loop"),
    **{f"/data/chain41/l{i}".encode(): Expected("ok") for i in range(1, 41)},
}
# data/replaced was a directory in layer 0 and is a file from layer 1 on: the link through it
# fails with ENOTDIR, broken by layer 1. Its verdict name is the engine's choice among the
# non-ok ones; errno and layer are not.
REPLACED = b"/data/lnk-replaced"
BUSYBOX_LINKS = {b"/bin/sh": Expected("ok")}


# -- helpers -----------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def raw(record: dict, name: str) -> bytes:
    """The exact bytes of a JSON text field (``<name>_b64`` when it is not UTF-8)."""
    if f"{name}_b64" in record:
        return base64.b64decode(record[f"{name}_b64"])
    return record[name].encode("utf-8")


def links_json(capsys: pytest.CaptureFixture[str], *argv: str, expect: int | None = None
               ) -> dict:
    code, out, err = run(capsys, "links", *argv, "-o", "json")
    if expect is not None:
        assert code == expect, err
    else:
        assert code in (0, 1), err
    doc = json.loads(out)
    assert doc["schema"] == "crifs/links/v1"
    return doc


def by_path(target: dict) -> dict[bytes, dict]:
    return {raw(rec, "path"): rec for rec in target["links"]}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("links-layout") / "layout"
    build_layout(dest, {REF: catalogue_layers()}, compression="gzip")
    return dest


@pytest.fixture
def audited(layout: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    doc = links_json(capsys, str(layout), "--show-ok", expect=1)
    assert len(doc["targets"]) == 1
    return doc["targets"][0]


# -- verdicts on the catalogue -----------------------------------------------------------------


def test_every_link_of_the_catalogue_gets_its_verdict(audited):
    found = by_path(audited)
    assert REPLACED in found
    expected = dict(EXPECTED)
    if not os.path.exists(HOST_ENV):
        expected[b"/usr/bin/host-env"] = Expected("broken")
    got = {
        path: Expected(rec["verdict"], rec["layer_added"], rec["layer_broken"])
        for path, rec in found.items() if path != REPLACED
    }
    assert got == expected


def test_link_through_a_directory_replaced_by_a_file_is_broken_by_that_layer(audited):
    rec = by_path(audited)[REPLACED]
    assert rec["verdict"] != "ok"
    assert rec["errno"] == "ENOTDIR"
    assert (rec["layer_added"], rec["layer_broken"]) == (0, 1)


def test_links_deleted_by_a_later_layer_are_not_reported(audited):
    paths = set(by_path(audited))
    assert b"/usr/bin/removed-link" not in paths  # whiteout of the link itself
    assert b"/usr/share/doc/pkg/inner" not in paths  # its directory was whited out


def test_errno_and_resolved_say_what_the_kernel_would(audited):
    found = by_path(audited)
    assert found[b"/usr/bin/broken-rel"]["errno"] == "ENOENT"
    assert found[b"/usr/bin/broken-rel"]["resolved"] == "/usr/lib/missing.so"
    assert found[b"/data/chain41/l0"]["errno"] == "ELOOP"
    assert found[b"/data/chain40/l0"]["errno"] is None
    assert found[b"/data/chain40/l0"]["resolved"] == "/usr/lib/libc.so.6"
    assert found[b"/data/notdir"]["errno"] == "ENOTDIR"
    assert found[b"/data/slash"]["errno"] == "ENOTDIR"
    assert found[b"/usr/bin/dotdot-ok"]["resolved"] == "/usr/lib/libc.so.6"
    assert found[b"/srv/through"]["resolved"] == "/usr/lib/libc.so.6"
    assert found[b"/usr/bin/via-lib64"]["errno"] == "ENOENT"
    for rec in audited["links"]:
        assert (rec["errno"] is None) == (rec["verdict"] == "ok"), rec


def test_severity_follows_the_verdict(audited):
    for rec in audited["links"]:
        if rec["verdict"] == "ok":
            assert rec["severity"] is None
        elif rec["verdict"] == "runtime_provided":
            assert rec["severity"] == "info"
        else:
            assert rec["severity"] in ("error", "warning"), rec


def test_a_fix_is_an_ln_command_that_names_the_link(audited):
    found = by_path(audited)
    fixes = {path: rec["fix"] for path, rec in found.items() if rec["fix"]}
    assert fixes, "no fix suggested for any link of the catalogue"
    for path, fix in fixes.items():
        assert fix.startswith("ln -s"), fix
        assert path.decode("utf-8", "backslashreplace") in fix or "_b64" in str(found[path])
    # /opt/tool -> lib/libc.so.6 was computed from the wrong directory: ../usr/lib/... or
    # /usr/lib/... resolves.
    tool_fix = found[b"/opt/tool"]["fix"]
    assert tool_fix is not None and "usr/lib/libc.so.6" in tool_fix
    assert found[b"/usr/bin/rel-ok"]["fix"] is None


def test_non_utf8_names_keep_their_exact_bytes(audited):
    found = by_path(audited)
    bad = found[b"/data/bad\xffname"]
    assert bad["path"] == "/data/bad\\xffname"
    assert base64.b64decode(bad["path_b64"]) == b"/data/bad\xffname"
    assert base64.b64decode(bad["target_b64"]) == b"missing\xfe"
    assert found[b"/data/with space"]["target"] == "target with space"
    assert "path_b64" not in found[b"/data/with space"]


def test_document_names_layers_and_counts_verdicts(audited):
    assert audited["kind"]
    assert [layer["index"] for layer in audited["layers"]] == [0, 1, 2]
    assert all(layer["ident"].startswith("sha256:") for layer in audited["layers"])
    counts: dict[str, int] = {}
    for rec in audited["links"]:
        counts[rec["verdict"]] = counts.get(rec["verdict"], 0) + 1
    assert audited["summary"] == counts
    assert audited["symlinks"] == len(audited["links"])
    assert audited["suppressed"] == 0


def test_cross_layer_hard_link_is_reported_with_its_layer(audited):
    hard = {(h["code"], raw(h, "path")): h for h in audited["hardlinks"]}
    assert ("cross_layer", b"/usr/lib/libc-hard.so") in hard
    finding = hard[("cross_layer", b"/usr/lib/libc-hard.so")]
    assert finding["layer"] == 1
    assert finding["target"] == "/usr/lib/libc.so.6"
    assert finding["severity"] in ("warning", "error")
    # A hard link inside one layer is fine.
    assert not [h for h in audited["hardlinks"] if raw(h, "path") == b"/usr/lib/libc-same.so"]


def test_ok_links_are_left_out_unless_asked_for(layout, capsys):
    doc = links_json(capsys, str(layout), expect=1)
    target = doc["targets"][0]
    assert target["links"]
    assert all(rec["verdict"] != "ok" for rec in target["links"])
    assert target["summary"]["ok"] == sum(1 for e in EXPECTED.values() if e.verdict == "ok")


# -- exit codes, --ignore, allow-list ------------------------------------------------------------


def _ok_image(tmp_path: Path, *extra_layers: list[Entry]) -> Path:
    dest = tmp_path / "ok-layout"
    base = [
        Entry("etc", "dir"), Entry("usr", "dir"), Entry("usr/lib", "dir"),
        Entry("usr/lib/a.so", "file", data=b"a"),
        Entry("usr/lib/b.so", "symlink", target="a.so"),
        Entry("etc/mtab", "symlink", target="../proc/self/mounts"),
    ]
    build_layout(dest, {REF: [base, *extra_layers]})
    return dest


def test_exit_status_follows_fail_on(layout, tmp_path, capsys):
    assert run(capsys, "links", str(layout))[0] == 1
    assert run(capsys, "links", str(layout), "--fail-on", "warning")[0] == 1
    assert run(capsys, "links", str(layout), "--fail-on", "never")[0] == 0
    only_info = _ok_image(tmp_path)
    assert run(capsys, "links", str(only_info))[0] == 0
    assert run(capsys, "links", str(only_info), "--fail-on", "warning")[0] == 0


def test_warning_findings_fail_only_from_warning(tmp_path, capsys):
    dest = tmp_path / "hard"
    base = [Entry("usr", "dir"), Entry("usr/a", "file", data=b"a")]
    build_layout(dest, {REF: [base, [Entry("usr/b", "hardlink", target="usr/a")]]})
    doc = links_json(capsys, str(dest), expect=0)
    severities = {h["severity"] for h in doc["targets"][0]["hardlinks"]}
    assert severities == {"warning"}
    assert run(capsys, "links", str(dest), "--fail-on", "warning")[0] == 1


def test_ignore_globs_drop_findings(layout, capsys):
    doc = links_json(
        capsys, str(layout), "--ignore", "/data/*", "--ignore", "usr/bin/*",
        "--ignore", "/opt/*", "--ignore", "/lib64", "--ignore", "/usr/lib/*",
        expect=0,
    )
    target = doc["targets"][0]
    assert all(rec["verdict"] == "runtime_provided" for rec in target["links"])
    assert target["hardlinks"] == []
    assert target["suppressed"] > 0
    assert "broken" not in target["summary"]


def test_allow_list_accepts_paths_and_single_verdicts(layout, tmp_path, capsys):
    allow = tmp_path / "allow.txt"
    allow.write_bytes(
        b"# accepted on purpose\n"
        b"\n"
        b"/data/*            \n"
        b"/usr/bin/*  broken  # only broken ones\n"
        b"/data/bad\xffname\n"
        b"/srv/#not-a-comment # but this is\n"
    )
    doc = links_json(capsys, str(layout), "--allow-list", str(allow))
    found = by_path(doc["targets"][0])
    assert not [p for p in found if p.startswith(b"/data/")]
    assert b"/usr/bin/broken-rel" not in found
    assert b"/usr/bin/gone" in found  # hidden_by_whiteout is not on the list
    assert b"/opt/tool" in found


def test_bad_allow_list_is_bad_input_in_one_line(layout, tmp_path, capsys):
    allow = tmp_path / "allow.txt"
    allow.write_text("/data/* brokn\n")
    code, out, err = run(capsys, "links", str(layout), "--allow-list", str(allow))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(allow) in err and "brokn" in err
    code, _, err = run(capsys, "links", str(layout), "--allow-list", str(tmp_path / "none"))
    assert code == 2 and err.count("\n") == 1 and "none" in err


def test_missing_target_is_bad_input(tmp_path, capsys):
    code, out, err = run(capsys, "links", str(tmp_path / "nothing-here"))
    assert code == 2 and out == ""
    assert err.startswith("crifs: ") and err.count("\n") == 1


def test_corrupt_layer_is_bad_input_without_traceback(tmp_path, capsys):
    dest = tmp_path / "corrupt"
    info = build_layout(dest, {REF: [[Entry("a", "file", data=b"x" * 4096)]]},
                        compression="gzip")
    blob = dest / "blobs" / "sha256" / info[REF].layer_digests[0].removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes()[:40])
    code, out, err = run(capsys, "links", str(dest))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err


def test_one_unreadable_target_among_several_does_not_hide_the_others(layout, tmp_path, capsys):
    dest = tmp_path / "corrupt"
    info = build_layout(dest, {REF: [[Entry("a", "file", data=b"x" * 4096)]]},
                        compression="gzip")
    blob = dest / "blobs" / "sha256" / info[REF].layer_digests[0].removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes()[:40])
    code, out, err = run(capsys, "links", str(layout), str(dest), "-o", "json")
    assert code == 2
    first, second = json.loads(out)["targets"]
    assert first["error"] is None and first["links"]
    assert second["error"] and second["links"] == []
    assert err.count("\n") == 1 and str(dest) in err
    code, out, _ = run(capsys, "links", str(layout), str(dest), "-o", "sarif")
    assert code == 2
    log = json.loads(out)
    _sarif_validator().validate(log)
    assert log["runs"][0]["invocations"][0]["executionSuccessful"] is False


def test_no_target_is_a_usage_error(capsys):
    code, _, err = run(capsys, "links")
    assert code == 2 and "TARGET" in err


# -- other sources -------------------------------------------------------------------------------


def test_oci_archive_with_zstd_layers_gives_the_same_verdicts(tmp_path, audited, capsys):
    dest = tmp_path / "zstd"
    build_layout(dest, {REF: catalogue_layers()}, compression="zstd")
    archive = layout_to_tar(dest, tmp_path / "image.tar")
    doc = links_json(capsys, str(archive), "--show-ok", expect=1)
    got = {p: r["verdict"] for p, r in by_path(doc["targets"][0]).items()}
    assert got == {p: r["verdict"] for p, r in by_path(audited).items()}


def test_all_images_of_a_layout(tmp_path, capsys):
    dest = tmp_path / "two"
    build_layout(dest, {
        "example.com/crifs/a:v1": [[Entry("x", "symlink", target="/nowhere")]],
        "example.com/crifs/b:v1": [[Entry("y", "symlink", target="/")]],
    })
    doc = links_json(capsys, str(dest), "--all-images", "--show-ok", expect=1)
    targets = {t["target"]: t for t in doc["targets"]}
    assert len(targets) == 2
    verdicts = sorted(
        (raw(rec, "path"), rec["verdict"]) for t in targets.values() for rec in t["links"]
    )
    assert verdicts == [(b"/x", "broken"), (b"/y", "ok")]


def _materialise(root: Path, layer: list[Entry]) -> None:
    """Write one layer's entries as a plain directory tree (no whiteouts)."""
    for entry in layer:
        path = os.path.join(os.fsencode(root), os.fsencode(entry.path))
        if entry.kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif entry.kind == "file":
            with open(path, "wb") as handle:
                handle.write(entry.data)
        elif entry.kind == "symlink":
            os.symlink(os.fsencode(entry.target), path)
        elif entry.kind == "hardlink":
            os.link(os.path.join(os.fsencode(root), os.fsencode(entry.target)), path)


def test_plain_rootfs_dir(tmp_path, capsys):
    root = tmp_path / "rootfs"
    root.mkdir()
    _materialise(root, base_layer())
    doc = links_json(capsys, str(root), "--show-ok", expect=1)
    target = doc["targets"][0]
    assert len(target["layers"]) == 1
    got = {p: r["verdict"] for p, r in by_path(target).items()}
    assert got[b"/usr/bin/gone"] == "ok"  # nothing deletes it in a single tree
    assert got[b"/usr/bin/removed-link"] == "broken"
    assert got[b"/data/chain41/l0"] == "loop"
    assert got[b"/data/chain40/l0"] == "ok"
    assert got[b"/data/bad\xffname"] == "broken"
    assert got[b"/etc/mtab"] == "runtime_provided"
    if os.path.exists(HOST_ENV):
        assert got[b"/usr/bin/host-env"] == "host_only"
    # The audit reads the tree: nothing is followed out of it, nothing is written.
    assert not (root / "proc").exists()


# -- output formats ------------------------------------------------------------------------------


def test_yaml_has_the_json_shape(layout, capsys):
    code, out, err = run(capsys, "links", str(layout), "-o", "yaml")
    assert code == 1, err
    doc = yaml.safe_load(out)
    assert doc["schema"] == "crifs/links/v1"
    assert set(doc["targets"][0]) >= {"target", "kind", "layers", "summary", "links",
                                      "hardlinks", "problems"}


def test_json_has_one_link_per_line(layout, capsys):
    code, out, _ = run(capsys, "links", str(layout), "-o", "json")
    assert code == 1
    link_lines = [line for line in out.splitlines() if '"verdict": ' in line]
    doc = json.loads(out)
    assert len(link_lines) == len(doc["targets"][0]["links"])


def test_table_groups_by_verdict_and_hides_ok(layout, capsys):
    code, out, _ = run(capsys, "links", str(layout))
    assert code == 1
    assert "VERDICT" in out and "COUNT" in out
    assert "LAYER ADDED" in out and "LAYER BROKEN" in out and "FIX" in out
    rows = [line for line in out.splitlines() if line.startswith("/")]
    verdict_of_rows = [re.split(r"\s{2,}", line)[2] for line in rows if "  " in line]
    assert "ok" not in verdict_of_rows
    # Grouped: each verdict's rows are contiguous.
    groups = [v for i, v in enumerate(verdict_of_rows) if i == 0 or verdict_of_rows[i - 1] != v]
    assert len(groups) == len(set(groups))
    assert "/data/bad\\xffname" in out
    code, out_ok, _ = run(capsys, "links", str(layout), "--show-ok")
    assert "/usr/bin/rel-ok" in out_ok and "/usr/bin/rel-ok" not in out


def _sarif_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_URI_REFERENCE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")


def test_sarif_validates_and_carries_every_finding(layout, capsys):
    code, out, err = run(capsys, "links", str(layout), "-o", "sarif")
    assert code == 1, err
    log = json.loads(out)
    _sarif_validator().validate(log)
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1
    run_ = log["runs"][0]
    assert run_["tool"]["driver"]["name"] == "crifs"
    rules = run_["tool"]["driver"]["rules"]
    results = run_["results"]
    doc = links_json(capsys, str(layout), expect=1)
    target = doc["targets"][0]
    assert len(results) == len(target["links"]) + len(target["hardlinks"])
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        location = result["locations"][0]["physicalLocation"]["artifactLocation"]
        assert location["uriBaseId"] == "ROOTFS"
        assert _URI_REFERENCE.match(location["uri"]) and not location["uri"].startswith("/")
        assert result["locations"][0]["logicalLocations"][0]["kind"] == "layer"
    by_uri = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]: r
              for r in results}
    assert by_uri["data/bad%FFname"]["ruleId"] == "L-broken"
    assert by_uri["data/broken%20space"]["level"] == "error"
    assert by_uri["etc/mtab"]["level"] == "note"
    gone = by_uri["usr/bin/gone"]
    assert gone["ruleId"] == "L-hidden_by_whiteout"
    assert (gone["properties"]["layer_added"], gone["properties"]["layer_broken"]) == (0, 1)
    assert by_uri["usr/lib/libc-hard.so"]["ruleId"] == "L-hardlink-cross_layer"
    # Fingerprints are stable from one run to the next.
    code, again, _ = run(capsys, "links", str(layout), "-o", "sarif")
    prints = [r["partialFingerprints"] for r in json.loads(again)["runs"][0]["results"]]
    assert prints == [r["partialFingerprints"] for r in results]
    assert len({json.dumps(p) for p in prints}) == len(prints)


def test_sarif_of_a_clean_image_validates_with_no_results(tmp_path, capsys):
    dest = tmp_path / "clean"
    build_layout(dest, {REF: [[Entry("a", "file"), Entry("b", "symlink", target="a")]]})
    code, out, _ = run(capsys, "links", str(dest), "-o", "sarif")
    assert code == 0
    log = json.loads(out)
    _sarif_validator().validate(log)
    assert log["runs"][0]["results"] == []


def test_global_options_may_follow_the_verb(layout, capsys):
    code, out, _ = run(capsys, "links", str(layout), "-ojson", "--fail-on", "never")
    assert code == 0 and json.loads(out)["schema"] == "crifs/links/v1"


@pytest.mark.skipif(not busybox_available(), reason="needs busybox-static (/bin/busybox)")
def test_busybox_image_adds_only_its_sh_link(tmp_path, capsys):
    dest = tmp_path / "bb"
    build_layout(dest, {REF: catalogue_layers(with_busybox=True)})
    doc = links_json(capsys, str(dest), "--show-ok", expect=1)
    found = by_path(doc["targets"][0])
    assert found[b"/bin/sh"]["verdict"] == "ok"
    assert set(found) - {REPLACED} == set(EXPECTED) | set(BUSYBOX_LINKS)


def test_nothing_is_written_to_the_layout(layout, capsys, tmp_path):
    before = sorted((p, p.stat().st_mtime_ns) for p in layout.rglob("*"))
    run(capsys, "links", str(layout), "-o", "json")
    assert sorted((p, p.stat().st_mtime_ns) for p in layout.rglob("*")) == before


# -- rendering alone, on hand-made verdicts --------------------------------------------------------


def _hand_made_report():
    from crifs.check.links import HardlinkFinding, LinkVerdict, Verdict
    from crifs.report.links import LayerInfo, TargetReport

    layers = [LayerInfo(0, "layer 0 sha256:aa", "sha256:aa"),
              LayerInfo(1, "layer 1 sha256:bb", "sha256:bb", ("member ../x climbs out",))]
    links = [
        LinkVerdict(b"lib", b"usr/lib", Verdict.BROKEN, "ENOENT", b"/usr/lib", 0, None,
                    "ln -sf usr/lib64 /lib", "target missing"),
        LinkVerdict(b"etc/mtab", b"/proc/self/mounts", Verdict.RUNTIME_PROVIDED, "ENOENT",
                    b"/proc/self/mounts", 0, None, None, "provided by the runtime"),
        LinkVerdict(b"a b\xff", b"t\xfe", Verdict.HIDDEN_BY_WHITEOUT, "ENOENT", b"/t\xfe", 0, 1,
                    None, "deleted by layer 1"),
    ]
    hardlinks = [HardlinkFinding("cross_layer", "warning", b"usr/b", b"usr/a", 1, "cross")]
    return TargetReport("layout:x", "oci-layout", layers, links, hardlinks,
                        {"broken": 1, "runtime_provided": 1, "hidden_by_whiteout": 1}, 0, 3)


def test_hand_made_report_renders_in_every_format():
    import io

    from crifs.report.links import write_links_document, write_links_table
    from crifs.report.output import Format
    from crifs.report.sarif import sarif_log

    report = _hand_made_report()
    out = io.StringIO()
    write_links_document([report], Format.JSON, out)
    doc = json.loads(out.getvalue())
    (target,) = doc["targets"]
    odd = target["links"][2]
    assert odd["path"] == "/a b\\xff" and base64.b64decode(odd["path_b64"]) == b"/a b\xff"
    assert base64.b64decode(odd["resolved_b64"]) == b"/t\xfe"
    assert target["problems"] == [{"layer": 1, "message": "member ../x climbs out"}]
    assert target["hardlinks"][0]["target"] == "/usr/a"
    table = io.StringIO()
    write_links_table([report], table)
    text = table.getvalue()
    assert "layer problem" in text and "#1" in text and "/a b\\xff" in text
    log = sarif_log([report])
    _sarif_validator().validate(log)
    uris = [r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in log["runs"][0]["results"]]
    assert uris == ["lib", "etc/mtab", "a%20b%FF", "usr/b"]
    (notification,) = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert "climbs out" in notification["message"]["text"]


def test_exit_status_counts_layer_problems_as_warnings():
    from crifs.cli.links import FailOn, exit_status
    from crifs.report.links import LayerInfo, TargetReport

    clean = TargetReport("x", "rootfs", [LayerInfo(0, "x", None)])
    assert exit_status([clean], FailOn.WARNING) == 0
    troubled = TargetReport("x", "rootfs", [LayerInfo(0, "x", None, ("duplicate entry a",))])
    assert exit_status([troubled], FailOn.ERROR) == 0
    assert exit_status([troubled], FailOn.WARNING) == 1
    assert exit_status([troubled], FailOn.NEVER) == 0


def test_link_records_of_utf8_and_other_bytes_are_built_alike() -> None:
    """``link_record`` has a fast path for UTF-8 verdicts; it must give the record the general
    path gives (escapes, ``_b64`` siblings, a single leading slash)."""
    from crifs.check.links import LinkVerdict, Verdict
    from crifs.report import links as links_report

    cases = [
        LinkVerdict(b"/usr/lib/x", b"../y", Verdict.OK, None, b"/usr/y", 0, None, None,
                    "/usr/lib/x -> ../y: resolves to /usr/y"),
        LinkVerdict(b"/caf\xc3\xa9", b"t\xc3\xa9", Verdict.BROKEN, "ENOENT", b"/t\xc3\xa9", 1, 1,
                    "ln -sf x /caf\xc3\xa9".encode().decode(), "caf\u00e9 broken"),
        LinkVerdict(b"/a b\xff", b"t\xfe", Verdict.HIDDEN_BY_WHITEOUT, "ENOENT", b"/t\xfe", 0, 2,
                    "ln -sf $'t\\xfe' $'/a b\\xff'", "/a b\\xff -> t\\xfe: gone"),
        LinkVerdict(b"//double", b"x", Verdict.LOOP, "ELOOP", b"//x", 0, 0, None, "m"),
        LinkVerdict(b"/l", b"x", Verdict.BROKEN, "ENOENT", b"/x", 0, 0, None,
                    os.fsdecode(b"odd \xff message")),
    ]
    for verdict in cases:
        fast = links_report.link_record(verdict)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(links_report, "_UTF8_NAMES", False)
            general = links_report.link_record(verdict)
        assert fast == general and list(fast) == list(general)


def test_progress_in_a_terminal_runs_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar is redrawn by its callers: a refresh thread would stop the walk and the judge
    from forking their helper (a forked child gets only one thread)."""
    import io
    import threading

    from crifs.cli.links import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    before = threading.active_count()
    with _Progress() as progress:
        progress.targets(2)
        progress.reading("rootfs /x")
        progress.reading_layer(0, 3, 12345)
        progress.resolving(4096, 8192)
        assert threading.active_count() == before
        progress.target_done()
    assert "reading rootfs /x" in terminal.getvalue()
    assert "layer 1/3, 12,345 entries" in terminal.getvalue()


def test_a_directory_of_100k_entries_is_an_input(tmp_path: Path, capsys) -> None:
    """One flat directory (no subdirectories to share between two walkers, more siblings than
    a near-name fix looks through): every link judged, the counts right, no fix guessed."""
    big = tmp_path / "rootfs" / "big"
    big.mkdir(parents=True)
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for number in range(100_000):
            os.close(os.open(f"f{number}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        for number in range(200):
            target = f"f{number * 7}" if number % 2 else f"f{number}x"
            os.symlink(target, f"L{number}", dir_fd=fd)
    finally:
        os.close(fd)
    doc = links_json(capsys, str(tmp_path / "rootfs"), expect=1)
    target = doc["targets"][0]
    assert target["symlinks"] == 200
    assert target["summary"] == {"broken": 100, "ok": 100}
    assert {raw(rec, "path") for rec in target["links"]} == {
        f"/big/L{number}".encode() for number in range(0, 200, 2)
    }
    assert all(rec["fix"] is None for rec in target["links"])


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_rootfs_tarball_from_the_cli(tmp_path: Path, capsys, compression) -> None:
    """A tar that holds no image (``docker export``, a rootfs tarball) is one layer; the CLI
    loads every target kind with its reading progress."""
    from ocibuild import compress, layer

    data = layer(
        Entry("usr", "dir"), Entry("usr/lib", "dir"), Entry("usr/lib/a.so", "file", data=b"a"),
        Entry("usr/lib/b.so", "symlink", target="a.so"),
        Entry("usr/lib/c.so", "symlink", target="/usr/lib/gone.so"),
    )
    path = tmp_path / "rootfs.tar"
    path.write_bytes(compress(data, compression))
    doc = links_json(capsys, str(path), "--show-ok", expect=1)
    [target] = doc["targets"]
    assert target["kind"] == "rootfs-tar"
    assert {raw(rec, "path"): rec["verdict"] for rec in target["links"]} == {
        b"/usr/lib/b.so": "ok",
        b"/usr/lib/c.so": "broken",
    }
