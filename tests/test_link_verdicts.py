"""Link verdicts, layer attribution, fixes, and hard-link findings."""

from __future__ import annotations

import subprocess
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crifs.check.fixes import ln_command, relative_path, shell_quote
from crifs.check.hardlinks import hardlink_findings, hardlink_groups
from crifs.check.links import SEVERITY, LinkVerdict, Verdict, audit
from crifs.fs.listing import Entry, EntryKind, LayerListing
from crifs.fs.merged import MergedView
from listing_cases import layer


def verdicts(*layers: LayerListing, host_root: str | None = None) -> dict[bytes, LinkVerdict]:
    return {item.path: item for item in audit(layers, host_root=host_root).verdicts}


BASE = {
    b"usr": b"dir",
    b"usr/bin": b"dir",
    b"usr/bin/python3.11": b"file",
    b"usr/lib": b"dir",
    b"usr/lib/libc.so.6": b"file",
    b"etc": b"dir",
}


def test_ok_link() -> None:
    got = verdicts(layer(0, {**BASE, b"usr/bin/python": b"->python3.11"}))[b"/usr/bin/python"]
    assert (got.verdict, got.errno, got.resolved) == (Verdict.OK, None, b"/usr/bin/python3.11")
    assert got.layer_added == 0 and got.layer_broken is None and got.fix is None
    assert got.severity is None
    assert got.message == "/usr/bin/python -> python3.11: resolves to /usr/bin/python3.11"


def test_hidden_by_whiteout_names_both_layers() -> None:
    got = verdicts(
        layer(0, {**BASE, b"usr/bin/python": b"->python3.11"}),
        layer(1, {b"usr/share": b"dir"}),
        layer(2, {b"usr": b"dir", b"usr/bin": b"dir", b"usr/bin/python3.11": b"wh"}),
    )[b"/usr/bin/python"]
    assert got.verdict is Verdict.HIDDEN_BY_WHITEOUT and got.errno == "ENOENT"
    assert (got.layer_added, got.layer_broken) == (0, 2)
    assert got.message == (
        "/usr/bin/python -> python3.11: target /usr/bin/python3.11 does not exist "
        "(added by layer 0, deleted by layer 2 whiteout)"
    )


def test_hidden_by_opaque_directory_on_a_component() -> None:
    got = verdicts(
        layer(0, {**BASE, b"lib": b"->usr/lib", b"etc/ld": b"->/lib/libc.so.6"}),
        layer(1, {b"usr": b"dir", b"usr/lib": b"opq", b"usr/lib/other": b"file"}),
    )[b"/etc/ld"]
    assert got.verdict is Verdict.HIDDEN_BY_OPAQUE
    assert got.resolved == b"/usr/lib/libc.so.6" and got.layer_broken == 1
    assert "hidden by layer 1 opaque directory /usr/lib" in got.message


def test_whiteout_of_a_whole_directory_on_the_path() -> None:
    got = verdicts(
        layer(
            0,
            {
                b"opt": b"dir",
                b"opt/app": b"dir",
                b"opt/app/bin": b"file",
                b"run-app": b"->opt/app/bin",
            },
        ),
        layer(1, {b"opt": b"dir", b"opt/app": b"wh"}),
    )[b"/run-app"]
    assert got.verdict is Verdict.HIDDEN_BY_WHITEOUT
    assert "/opt/app does not exist (needed for /opt/app/bin)" in got.message
    assert "whiteout)" in got.message


def test_replaced_directory_is_broken_by_the_replacing_layer() -> None:
    got = verdicts(
        layer(
            0,
            {
                b"opt": b"dir",
                b"opt/app": b"dir",
                b"opt/app/lib": b"file",
                b"srv": b"dir",
                b"l": b"->/opt/app/lib",
            },
        ),
        layer(1, {b"opt": b"dir", b"opt/app": b"->/srv"}),
    )[b"/l"]
    assert got.verdict is Verdict.BROKEN and got.layer_broken == 1
    assert got.resolved == b"/srv/lib"
    assert "removed when layer 1 replaced /opt/app" in got.message


def test_link_broken_from_the_start_is_broken_by_its_own_layer() -> None:
    got = verdicts(
        layer(0, BASE),
        layer(1, {b"usr": b"dir", b"usr/bin": b"dir", b"usr/bin/py": b"->python3.12"}),
        layer(2, {b"usr": b"dir", b"usr/bin": b"dir", b"usr/bin/other": b"file"}),
    )[b"/usr/bin/py"]
    assert got.verdict is Verdict.BROKEN
    assert (got.layer_added, got.layer_broken) == (1, 1)
    assert got.message == "/usr/bin/py -> python3.12: target /usr/bin/python3.12 does not exist"


def test_repointed_intermediate_symlink_is_blamed_on_its_layer() -> None:
    got = verdicts(
        layer(0, {**BASE, b"py": b"->usr/bin/python3.11", b"l": b"->py"}),
        layer(1, {b"py": b"->usr/bin/python3.13"}),
    )[b"/l"]
    assert got.verdict is Verdict.BROKEN and got.layer_broken == 1


def test_target_deleted_before_the_link_was_added() -> None:
    got = verdicts(
        layer(0, BASE),
        layer(1, {b"usr": b"dir", b"usr/lib": b"dir", b"usr/lib/libc.so.6": b"wh"}),
        layer(2, {b"libc": b"->usr/lib/libc.so.6"}),
    )[b"/libc"]
    assert got.verdict is Verdict.HIDDEN_BY_WHITEOUT
    assert (got.layer_added, got.layer_broken) == (2, 1)


def test_loop_and_long_chain() -> None:
    spec = {b"a": b"->b", b"b": b"->a"}
    spec.update({b"c%d" % i: b"->c%d" % (i + 1) for i in range(45)})
    got = verdicts(layer(0, spec))
    assert got[b"/a"].verdict is Verdict.LOOP and got[b"/a"].errno == "ELOOP"
    assert got[b"/a"].message == "/a -> b: symlink loop through /a, /b"
    assert got[b"/c0"].verdict is Verdict.LOOP
    assert "more than 40 symlinks" in got[b"/c0"].message
    assert got[b"/c10"].verdict is Verdict.BROKEN  # 35 links, then /c45 is missing


def test_not_a_directory() -> None:
    got = verdicts(layer(0, {b"f": b"file", b"l": b"->f/x", b"s": b"->f/"}))
    for path in (b"/l", b"/s"):
        assert got[path].verdict is Verdict.NOT_A_DIRECTORY and got[path].errno == "ENOTDIR"
    assert got[b"/l"].message == "/l -> f/x: /f is not a directory (needed for /f/x)"


def test_replaced_by_file_not_a_directory_blames_the_replacing_layer() -> None:
    got = verdicts(
        layer(0, {b"d": b"dir", b"d/x": b"file", b"l": b"->d/x"}),
        layer(1, {b"d": b"file"}),
    )[b"/l"]
    assert got.verdict is Verdict.NOT_A_DIRECTORY and got.layer_broken == 1


@pytest.mark.parametrize(
    ("path", "target"),
    [
        (b"etc/mtab", b"../proc/self/mounts"),
        (b"etc/resolv.conf", b"../run/systemd/resolve/stub-resolv.conf"),
        (b"etc/tty", b"/dev/console"),
        (b"hosts-link", b"/etc/hosts"),
        (b"kernel", b"/sys/kernel"),
    ],
)
def test_runtime_provided_is_info(path: bytes, target: bytes) -> None:
    got = verdicts(layer(0, {b"etc": b"dir", b"dev": b"dir", path: b"->" + target}))[b"/" + path]
    assert got.verdict is Verdict.RUNTIME_PROVIDED and got.severity == "info"
    assert got.layer_broken is None and got.fix is None


def test_host_only_needs_the_host_path_and_only_lstats_it(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "root/.local/share/uv").mkdir(parents=True)
    (host / "root/.local/share/uv/python3").symlink_to("/does/not/exist")  # lexists is enough
    image = layer(
        0,
        {
            b"app": b"dir",
            b"app/python": b"->/root/.local/share/uv/python3",
            b"app/other": b"->/nowhere",
        },
    )
    got = verdicts(image, host_root=str(host))
    assert got[b"/app/python"].verdict is Verdict.HOST_ONLY
    assert got[b"/app/python"].severity == "error"
    assert got[b"/app/other"].verdict is Verdict.BROKEN
    assert verdicts(image, host_root=None)[b"/app/python"].verdict is Verdict.BROKEN


def test_fix_absolute_target_read_relative_to_link_dir() -> None:
    got = verdicts(
        layer(
            0,
            {
                b"opt": b"dir",
                b"opt/app": b"dir",
                b"opt/app/lib": b"dir",
                b"opt/app/lib/x.so": b"file",
                b"opt/app/l": b"->/lib/x.so",
            },
        )
    )
    assert got[b"/opt/app/l"].fix == "ln -sf lib/x.so /opt/app/l"


def test_fix_relative_target_read_as_absolute() -> None:
    got = verdicts(
        layer(0, {**BASE, b"usr/local": b"dir", b"usr/local/python": b"->usr/bin/python3.11"})
    )
    assert got[b"/usr/local/python"].fix == "ln -sf /usr/bin/python3.11 /usr/local/python"


def test_fix_basename_found_once_elsewhere() -> None:
    got = verdicts(
        layer(
            0,
            {
                **BASE,
                b"usr/share": b"dir",
                b"usr/share/doc": b"dir",
                b"usr/share/doc/l": b"->../../lib64/libc.so.6",
                b"usr/share/doc/dup": b"->python3.11/x",
                b"usr/share/doc/amb": b"->../same",
                b"a": b"dir",
                b"a/same": b"file",
                b"b": b"dir",
                b"b/same": b"file",
            },
        )
    )
    assert got[b"/usr/share/doc/l"].fix == "ln -sf ../../lib/libc.so.6 /usr/share/doc/l"
    assert got[b"/usr/share/doc/dup"].fix is None  # no file named x anywhere
    assert got[b"/usr/share/doc/amb"].fix is None  # "same" occurs twice


def test_fix_near_miss_name_in_the_directory_looked_in() -> None:
    got = verdicts(
        layer(
            0,
            {
                **BASE,
                b"app": b"dir",
                b"app/config.yaml": b"file",
                b"app/current": b"->config.yml",
                b"app/abs": b"->/app/config.yml",
                b"app/v1.1.so": b"file",
                b"app/v1.2.so": b"file",
                b"app/tie": b"->v1.3.so",
                b"app/far": b"->completely-different",
            },
        )
    )
    assert got[b"/app/current"].fix == "ln -sf config.yaml /app/current"
    assert got[b"/app/abs"].fix == "ln -sf /app/config.yaml /app/abs"  # keeps the style
    assert got[b"/app/tie"].fix is None  # two equally close names: no guess
    assert got[b"/app/far"].fix is None


def test_fix_never_for_runtime_or_ok_and_links_to_itself_are_skipped() -> None:
    got = verdicts(layer(0, {b"d": b"dir", b"d/loner": b"->../loner"}))
    assert got[b"/d/loner"].fix is None  # the only "loner" is the link itself


def test_non_utf8_link_message_and_fix() -> None:
    got = verdicts(layer(0, {b"d\xff": b"dir", b"d\xff/t\xfe": b"file", b"d\xff/l": b"->/t\xfe"}))[
        b"/d\xff/l"
    ]
    assert got.verdict is Verdict.BROKEN
    assert got.message == "/d\\xff/l -> /t\\xfe: target /t\\xfe does not exist"
    assert got.fix == "ln -sf $'t\\xfe' $'/d\\xff/l'"


def test_shell_quote_round_trips_through_bash(tmp_path: Path) -> None:
    for raw in (b"plain", b"with space", b"it's", b"\xff\xfeback\\slash'q", b"-dash", b"\xc3a"):
        word = shell_quote(raw)
        out = subprocess.run(
            ["bash", "-c", f"printf %s {word}"], capture_output=True, check=True
        ).stdout
        assert out == raw, (raw, word)
    assert ln_command(b"-x", b"/l") == "ln -sf -- -x /l"


def test_relative_path() -> None:
    assert relative_path(b"/usr/lib/x", b"/usr/bin") == b"../lib/x"
    assert relative_path(b"/usr/bin/x", b"/usr/bin") == b"x"
    assert relative_path(b"/x", b"/") == b"x"
    assert relative_path(b"/a", b"/a") == b"."


def test_empty_and_4096_byte_targets_are_broken_not_a_crash() -> None:
    long_target = (b"x" * 255 + b"/") * 16
    got = verdicts(layer(0, {b"e": b"->", b"long": b"->" + long_target[:4096]}))
    assert (
        got[b"/e"].verdict is Verdict.BROKEN and got[b"/e"].message == "/e -> : the target is empty"
    )
    assert got[b"/long"].verdict is Verdict.BROKEN


def test_severity_table_and_summary() -> None:
    assert SEVERITY[Verdict.OK] is None
    assert SEVERITY[Verdict.RUNTIME_PROVIDED] == "info"
    assert {SEVERITY[v] for v in Verdict if v not in (Verdict.OK, Verdict.RUNTIME_PROVIDED)} == {
        "error"
    }
    result = audit([layer(0, {b"a": b"->b", b"b": b"file", b"c": b"->d"})], host_root=None)
    assert result.summary()["ok"] == 1 and result.summary()["broken"] == 1
    assert set(result.summary()) == {v.value for v in Verdict}


def test_ok_verdicts_left_out_are_still_counted() -> None:
    layers = [
        layer(0, {b"a": b"->b", b"b": b"file", b"c": b"->d", b"e": b"->a", b"f": b"->/b"}),
        layer(1, {b"h": b"->b", b"g": b"->/proc/x"}),
    ]
    every = audit(layers, host_root=None)
    lean = audit(layers, host_root=None, keep_ok=False)
    assert lean.verdicts == [v for v in every.verdicts if v.verdict is not Verdict.OK]
    assert lean.summary() == every.summary()
    assert lean.symlinks == every.symlinks == 6
    assert every.summary()["ok"] == 4 and lean.ok_left_out == 4
    assert every.ok_left_out == 0


def test_progress_is_reported() -> None:
    seen: list[tuple[int, int]] = []
    audit([layer(0, {b"a": b"->b"})], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (1, 1)


# -- hard links ---------------------------------------------------------------------------


def codes(*layers: LayerListing) -> list[tuple[str, str, bytes, bytes, int]]:
    return [(f.code, f.severity, f.path, f.target, f.layer) for f in hardlink_findings(layers)]


def test_hard_link_within_the_layer_is_fine() -> None:
    assert codes(layer(0, {b"a": b"file", b"b": b"=>a"})) == []


def test_cross_layer_hard_link() -> None:
    assert codes(layer(0, {b"a": b"file"}), layer(1, {b"b": b"=>a"})) == [
        ("cross_layer", "warning", b"/b", b"/a", 1)
    ]


def test_hard_link_to_a_target_deleted_by_a_later_layer() -> None:
    found = hardlink_findings(
        [layer(0, {b"a": b"file"}), layer(1, {b"a": b"wh"}), layer(2, {b"b": b"=>a"})]
    )
    assert [(f.code, f.layer) for f in found] == [("whited_out", 2)]
    assert "added by layer 0 and deleted by layer 1" in found[0].message


def test_hard_link_to_a_target_its_own_layer_whites_out() -> None:
    own = layer(1, {b"b": b"=>d/a"})
    own.opaque.add(b"d")
    assert codes(layer(0, {b"d": b"dir", b"d/a": b"file"}), own) == [
        ("whited_out", "error", b"/b", b"/d/a", 1)
    ]
    assert codes(layer(0, {b"a": b"file"}), layer(1, {b"b": b"=>a", b"a": b"wh"}))[0][0] == (
        "whited_out"
    )


def test_dangling_hard_links() -> None:
    assert codes(layer(0, {b"b": b"=>nowhere"})) == [("dangling", "error", b"/b", b"/nowhere", 0)]
    assert codes(layer(0, {b"d": b"dir", b"b": b"=>d"}))[0][0] == "dangling"
    assert codes(layer(0, {b"d": b"dir"}), layer(1, {b"b": b"=>d"}))[0][0] == "dangling"


def test_chained_hard_links_are_followed() -> None:
    found = codes(layer(0, {b"end": b"file", b"link1": b"=>end", b"link10": b"=>link1"}))
    assert found == [("chained", "info", b"/link10", b"/end", 0)]
    crossing = codes(layer(0, {b"end": b"file"}), layer(1, {b"l1": b"=>end", b"l2": b"=>l1"}))
    assert [c[0] for c in crossing] == ["cross_layer", "chained", "cross_layer"]
    looping = codes(layer(0, {b"a": b"=>b", b"b": b"=>a"}))
    assert ("dangling", "error", b"/a", b"/a", 0) in looping


def test_hardlink_groups() -> None:
    tar = layer(0, {b"end": b"file", b"l1": b"=>end", b"l2": b"=>l1", b"solo": b"file"})
    assert hardlink_groups(tar) == [[b"end", b"l1", b"l2"]]


def inode_layer(index: int, groups: dict[bytes, tuple[tuple[int, int], int]]) -> LayerListing:
    listing = LayerListing(index, f"dir layer {index}")
    for path, (inode, nlink) in groups.items():
        listing.entries[path] = Entry(EntryKind.FILE, inode=inode, nlink=nlink)
    return listing


def test_nlink_mismatch_in_directory_layers() -> None:
    listing = inode_layer(
        3,
        {
            b"ok1": ((1, 10), 2),
            b"ok2": ((1, 10), 2),
            b"more": ((1, 11), 3),
            b"fewer1": ((1, 12), 1),
            b"fewer2": ((1, 12), 1),
        },
    )
    found = {f.path: f for f in hardlink_findings([listing])}
    assert set(found) == {b"/more", b"/fewer1"}
    assert found[b"/more"].severity == "info" and found[b"/more"].layer == 3
    assert "other 2 link(s) live outside this layer" in found[b"/more"].message
    assert found[b"/fewer1"].severity == "warning"
    assert hardlink_groups(listing) == [[b"fewer1", b"fewer2"], [b"ok1", b"ok2"]]


def test_deletion_on_the_literal_path_of_an_intermediate_hop() -> None:
    # /l -> /alias/x; /alias -> /opt/app; layer 1 replaced the directory /opt/app by a
    # symlink to /srv: what the second hop needs (/opt/app/x) was removed by layer 1
    got = verdicts(
        layer(
            0,
            {
                b"opt": b"dir",
                b"opt/app": b"dir",
                b"opt/app/x": b"file",
                b"srv": b"dir",
                b"alias": b"->/opt/app",
                b"l": b"->/alias/x",
            },
        ),
        layer(1, {b"opt": b"dir", b"opt/app": b"->/srv"}),
    )[b"/l"]
    assert got.verdict is Verdict.BROKEN and got.layer_broken == 1
    assert got.resolved == b"/srv/x"
    assert "removed when layer 1 replaced /opt/app" in got.message


_NAMES = [b"a", b"b", b"c"]
_paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3).map(b"/".join)
_targets = st.builds(
    lambda lead, parts: lead + b"/".join(parts),
    st.sampled_from([b"", b"/", b"../"]),
    st.lists(st.sampled_from([*_NAMES, b".."]), max_size=3),
)
_kinds = st.one_of(st.sampled_from([b"dir", b"file", b"wh", b"opq"]), _targets.map(b"->".__add__))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_paths, _kinds, max_size=8), min_size=1, max_size=4))
def test_quick_route_gives_the_verdicts_of_the_component_walk(
    specs: list[dict[bytes, bytes]],
) -> None:
    # the resolver's quick route (and the explanations built from it) against the plain
    # component-by-component walk, which a view that is not consistent always takes
    layers = [layer(index, spec) for index, spec in enumerate(specs)]
    fast = audit(layers, host_root=None).verdicts
    with mock.patch.object(MergedView, "consistent", new=property(lambda self: False)):
        slow = audit(layers, host_root=None).verdicts
    assert fast == slow


# -- two processes and the shared path scan -----------------------------------------------


def _many_links_layer() -> LayerListing:
    """Links of every verdict, with reading, basename and near-name fixes, in order."""
    spec: dict[bytes, bytes] = dict(BASE)
    spec[b"app"] = b"dir"
    for i in range(30):  # 210 names in app/: few enough for near-name fixes
        spec[b"app/config%02d.yaml" % i] = b"file"
        # by path, each kind runs through both halves of the list
        spec[b"app/x%02dl" % i] = b"->config%02d.yml" % i  # near name
        spec[b"app/x%02dm" % i] = b"->/usr/lib/libc.so.6"  # ok
        spec[b"app/x%02dn" % i] = b"->../lib64/libc.so.6"  # basename
        spec[b"app/x%02do" % i] = b"->usr/bin/python3.11"  # relative read as absolute
        spec[b"app/x%02dp" % i] = b"->x%02dp" % i  # loop
        spec[b"app/x%02dq" % i] = b"->/proc/self/mounts"  # runtime
    return layer(0, spec)


def test_two_processes_give_the_one_process_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    from crifs.check import fixes
    from crifs.check import links as links_module

    listing = _many_links_layer()
    monkeypatch.setattr(links_module, "PARALLEL_LINKS", 0)
    alone = audit([listing], host_root=None).verdicts
    assert sum(v.fix is not None for v in alone) == 90
    monkeypatch.setattr(links_module, "PARALLEL_LINKS", 2)
    progress: list[tuple[int, int]] = []
    shared = audit([listing], host_root=None, progress=lambda *a: progress.append(a)).verdicts
    assert shared == alone and progress[-1] == (len(alone), len(alone))
    # the near-name cap counts the candidates of both halves, in order
    for cap in (0, 5, 25, 40):
        monkeypatch.setattr(fixes, "NEAR_MAX_LINKS", cap)
        monkeypatch.setattr(links_module, "PARALLEL_LINKS", 0)
        capped = audit([listing], host_root=None).verdicts
        assert sum(v.fix is not None and "config" in v.fix for v in capped) == min(cap, 30)
        monkeypatch.setattr(links_module, "PARALLEL_LINKS", 2)
        assert audit([listing], host_root=None).verdicts == capped


def test_a_failed_helper_leaves_its_runs_to_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    from crifs.check import links as links_module

    listing = _many_links_layer()
    monkeypatch.setattr(links_module, "PARALLEL_LINKS", 0)
    alone = audit([listing], host_root=None).verdicts
    monkeypatch.setattr(links_module, "PARALLEL_LINKS", 2)
    monkeypatch.setattr(links_module, "export_runs", lambda runs: b"not a pickle")
    assert audit([listing], host_root=None).verdicts == alone


def test_path_scan_finds_what_a_plain_loop_finds() -> None:
    from crifs.check.fixes import NEAR_MAX_SIBLINGS, PathScan

    paths = [b"", b"top", b"a", b"a/x", b"a/b/x", b"a/b/y", b"c/x", b"c/y", b"y"]
    paths += [b"big/f%d" % i for i in range(NEAR_MAX_SIBLINGS + 5)]
    names, dirs = {b"x", b"y", b"f3", b"absent"}, {b"", b"a", b"a/b", b"big", b"none"}
    scan = PathScan(iter(paths), names=names, dirs=dirs)
    for name in names:
        expected = [p for p in paths if p.rpartition(b"/")[2] == name][:2]
        assert scan.places.get(name, []) == expected
    for directory in dirs:
        expected = [p.rpartition(b"/")[2] for p in paths if p.rpartition(b"/")[0] == directory]
        assert scan.children[directory] == expected[: NEAR_MAX_SIBLINGS + 1]
