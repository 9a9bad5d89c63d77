"""A link audit as SARIF 2.1.0, for code-scanning dashboards (``crifs links -o sarif``).

One log with one run. ``tool.driver`` lists one rule per link verdict (``L-<verdict>``) and per
hard-link finding (``L-hardlink-<code>``), each with its default level. Each finding becomes a
result:

- ``locations[0].physicalLocation.artifactLocation``: ``uri`` is the rootfs path without its
  leading ``/``, percent-encoded from its exact bytes (so a non-UTF-8 name survives), relative
  to ``uriBaseId`` ``ROOTFS``, the root of the audited target;
- ``locations[0].logicalLocations``: the layer that added the link (``kind`` ``layer``);
- ``partialFingerprints["crifsLinkFinding/v1"]``: a hash of audit target, path and verdict,
  stable across runs, so a dashboard tracks a finding rather than a line;
- ``properties``: ``audit_target``, ``link_target``, ``verdict``, ``errno``, ``resolved``,
  ``layer_added``, ``layer_broken`` (indexes, plus ``*_name``) and ``fix``.

Layer problems (bad tar members that were tolerated) become tool execution notifications.
Levels: severity ``error`` → ``error``, ``warning`` → ``warning``, ``info`` → ``note``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from crifs import __version__
from crifs.check.links import SEVERITY, HardlinkFinding, LinkVerdict, Verdict
from crifs.report.links import TargetReport, rootfs_path, severity_of
from crifs.report.values import b64_of, escape_text

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
URI_BASE = "ROOTFS"
FINGERPRINT_KEY = "crifsLinkFinding/v1"

LEVEL_OF_SEVERITY = {"error": "error", "warning": "warning", "info": "note"}

# (name, short description, help) per verdict: what a reader of a dashboard needs.
_VERDICT_RULES: dict[str, tuple[str, str, str]] = {
    "broken": (
        "BrokenSymlink",
        "Symlink target does not exist in the image",
        "Resolved inside the container's root, as the kernel does, the link reaches a path "
        "that no layer provides (ENOENT). Point it at a path that exists (see the fix), ship "
        "the missing file, or remove the link.",
    ),
    "hidden_by_whiteout": (
        "SymlinkTargetWhitedOut",
        "Symlink target deleted by a whiteout in a later layer",
        "The target existed in a lower layer but a later layer deleted it (.wh. whiteout or "
        "an overlay whiteout device). Keep the target, or remove or repoint the link in the "
        "layer that deletes it.",
    ),
    "hidden_by_opaque": (
        "SymlinkTargetHiddenByOpaqueDir",
        "Symlink target hidden by an opaque directory in a later layer",
        "A later layer replaced a directory on the target's path with an opaque one "
        "(.wh..wh..opq or overlay.opaque), hiding the lower target. Recreate the target in "
        "that layer or repoint the link.",
    ),
    "loop": (
        "SymlinkLoop",
        "Symlink resolution loops (ELOOP)",
        "Resolving the link follows more than 40 symlinks, the Linux limit, or goes round in "
        "a circle. Break the cycle or shorten the chain.",
    ),
    "not_a_directory": (
        "SymlinkThroughNonDirectory",
        "A component of the symlink target is not a directory (ENOTDIR)",
        "Resolution reaches a file where a directory is needed (in the middle of the path, "
        "or before a trailing slash). Fix the target path.",
    ),
    "host_only": (
        "SymlinkToHostOnlyPath",
        "Absolute symlink resolves only on the build host",
        "The absolute target is missing in the image but exists on the machine that ran the "
        "audit: it works on the build machine and fails in the container. Ship the target in "
        "the image or point the link at a path inside it.",
    ),
    "runtime_provided": (
        "SymlinkToRuntimeProvidedPath",
        "Symlink target is provided by the container runtime",
        "The target is under /proc, /sys, /dev or /run, or a file a runtime creates "
        "(resolv.conf, hosts, hostname, mtab): dangling in the image, usually fine in a "
        "running container.",
    ),
}

# (name, short description, help, default severity) per hard-link finding code.
_HARDLINK_RULES: dict[str, tuple[str, str, str, str]] = {
    "cross_layer": (
        "HardlinkAcrossLayers",
        "Tar hard link to a file in another layer",
        "The OCI spec leaves hard links to files of lower layers undefined: extractors "
        "either copy the data or fail. Rebuild so the layer carries the file itself.",
        "warning",
    ),
    "whited_out": (
        "HardlinkToWhitedOutFile",
        "Tar hard link to a file deleted by a whiteout",
        "The hard link names a file that a whiteout removed before this layer; extraction "
        "fails or links to nothing.",
        "error",
    ),
    "dangling": (
        "DanglingHardlink",
        "Tar hard link to a file that does not exist",
        "The hard link names a member that neither this layer nor a lower one provides; "
        "extraction fails.",
        "error",
    ),
    "chained": (
        "ChainedHardlink",
        "Tar hard link to another hard link",
        "The link's target is itself a hard-link member (buildah writes such chains); tools "
        "that do not follow the chain extract it wrongly.",
        "info",
    ),
    "nlink_mismatch": (
        "HardlinkCountMismatch",
        "Link count differs from the hard-link group seen",
        "The file's link count does not match the number of names seen for its inode in the "
        "layer: some names were lost or live outside the layer.",
        "warning",
    ),
}

HARDLINK_CODES = tuple(_HARDLINK_RULES)


def verdict_rule_id(verdict: Verdict | str) -> str:
    return f"L-{Verdict(verdict).value}"


def hardlink_rule_id(code: str) -> str:
    return f"L-hardlink-{code}"


def _rule(rule_id: str, name: str, short: str, help_text: str, severity: str) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": short},
        "fullDescription": {"text": help_text},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": LEVEL_OF_SEVERITY.get(severity, "warning")},
        "properties": {"severity": severity},
    }


def _rules(hardlink_codes: Sequence[str]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for verdict in Verdict:
        severity = SEVERITY.get(verdict)
        if severity is None:
            continue  # ok links are not findings
        name, short, help_text = _VERDICT_RULES.get(
            verdict.value,
            (verdict.value.title().replace("_", ""), f"Symlink verdict {verdict.value}", ""),
        )
        rules.append(_rule(verdict_rule_id(verdict), name, short, help_text or short, severity))
    known = list(_HARDLINK_RULES)
    for code in known + sorted(set(hardlink_codes) - set(known)):
        name, short, help_text, severity = _HARDLINK_RULES.get(
            code, ("Hardlink" + code.title().replace("_", ""), f"Hard link finding {code}",
                   f"Hard link finding {code}", "warning"),
        )
        rules.append(_rule(hardlink_rule_id(code), name, short, help_text, severity))
    return rules


def artifact_uri(path: bytes) -> str:
    """The rootfs path as a relative URI: no leading ``/``, every unsafe byte percent-encoded."""
    return urllib.parse.quote(path.lstrip(b"/"), safe="/")


def fingerprint(label: str, path: bytes, code: str) -> str:
    digest = hashlib.sha256()
    for part in (os.fsencode(label), path.lstrip(b"/"), code.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _text(value: str | None) -> str | None:
    return None if value is None else escape_text(value)


class _TargetContext:
    """What every result of one target shares, computed once per target, not per result."""

    def __init__(self, report: TargetReport, rule_index: dict[str, int]) -> None:
        self.report = report
        self.label = report.label
        self.label_text = escape_text(report.label)
        self.layer_names = {layer.index: escape_text(layer.name) for layer in report.layers}
        self.rule_index = rule_index

    def layer_name(self, index: int | None) -> str | None:
        if index is None:
            return None
        return self.layer_names.get(index, str(index))

    def location(self, path: bytes, layer: int) -> dict[str, Any]:
        return {
            "physicalLocation": {
                "artifactLocation": {"uri": artifact_uri(path), "uriBaseId": URI_BASE}
            },
            "logicalLocations": [
                {
                    "name": self.layer_name(layer),
                    "fullyQualifiedName": f"{self.label_text}#layer{layer}",
                    "kind": "layer",
                }
            ],
        }

    def link_result(self, v: LinkVerdict) -> dict[str, Any]:
        rule_id = verdict_rule_id(v.verdict)
        severity = severity_of(v) or "info"
        link_target = os.fsdecode(v.target)
        target_text = escape_text(link_target)
        message = escape_text(v.message) if v.message else (
            f"{escape_text(rootfs_path(v.path))} -> {target_text}: {v.verdict.value}"
        )
        if v.fix:
            message = f"{message} Fix: {escape_text(v.fix)}"
        properties: dict[str, Any] = {
            "audit_target": self.label_text,
            "link_target": target_text,
            "verdict": v.verdict.value,
            "errno": v.errno,
            "resolved": escape_text(rootfs_path(v.resolved)),
            "layer_added": v.layer_added,
            "layer_added_name": self.layer_name(v.layer_added),
            "layer_broken": v.layer_broken,
            "layer_broken_name": self.layer_name(v.layer_broken),
            "fix": _text(v.fix),
        }
        if target_text != link_target:
            properties["link_target_b64"] = b64_of(link_target)
        return {
            "ruleId": rule_id,
            "ruleIndex": self.rule_index[rule_id],
            "level": LEVEL_OF_SEVERITY.get(severity, "warning"),
            "message": {"text": message},
            "locations": [self.location(v.path, v.layer_added)],
            "partialFingerprints": {
                FINGERPRINT_KEY: fingerprint(self.label, v.path, v.verdict.value)
            },
            "properties": properties,
        }

    def hardlink_result(self, h: HardlinkFinding) -> dict[str, Any]:
        rule_id = hardlink_rule_id(h.code)
        return {
            "ruleId": rule_id,
            "ruleIndex": self.rule_index[rule_id],
            "level": LEVEL_OF_SEVERITY.get(h.severity, "warning"),
            "message": {"text": escape_text(h.message) or f"hard link {h.code}"},
            "locations": [self.location(h.path, h.layer)],
            "partialFingerprints": {
                FINGERPRINT_KEY: fingerprint(self.label, h.path, f"hardlink-{h.code}")
            },
            "properties": {
                "audit_target": self.label_text,
                "link_target": escape_text(rootfs_path(h.target)) if h.target else None,
                "code": h.code,
                "layer": h.layer,
                "layer_name": self.layer_name(h.layer),
            },
        }


def _results(reports: Sequence[TargetReport], rule_index: dict[str, int]
             ) -> Iterator[dict[str, Any]]:
    """Every finding of ``reports`` as a SARIF result, target by target (ok links left out)."""
    for report in reports:
        if report.error is not None:
            continue
        context = _TargetContext(report, rule_index)
        for verdict in report.links:
            if severity_of(verdict):
                yield context.link_result(verdict)
        for finding in report.hardlinks:
            yield context.hardlink_result(finding)


def _notifications(reports: Sequence[TargetReport]) -> list[dict[str, Any]]:
    notifications: list[dict[str, Any]] = []
    for report in reports:
        label = escape_text(report.label)
        if report.error is not None:
            notifications.append({
                "level": "error",
                "message": {"text": f"{label}: not audited: {escape_text(report.error)}"},
            })
        for index, problem in report.problems():
            notifications.append({
                "level": "warning",
                "message": {"text": f"{label}: layer {index}: {escape_text(problem)}"},
            })
    return notifications


def _envelope(reports: Sequence[TargetReport]) -> tuple[dict[str, Any], dict[str, int]]:
    """The log without its results, and the index of each rule id."""
    rules = _rules(sorted({h.code for r in reports for h in r.hardlinks}))
    invocation: dict[str, Any] = {
        "executionSuccessful": all(r.error is None for r in reports)
    }
    notifications = _notifications(reports)
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "crifs",
                "version": __version__,
                "semanticVersion": __version__,
                "rules": rules,
            }
        },
        "originalUriBaseIds": {
            URI_BASE: {
                "description": {
                    "text": "The root of the audited image, snapshot, container or rootfs; "
                    "see each result's audit_target property."
                }
            }
        },
        "invocations": [invocation],
        "columnKind": "unicodeCodePoints",
        "results": [],
        "properties": {"audit_targets": [escape_text(r.label) for r in reports]},
    }
    log = {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION, "runs": [run]}
    return log, {rule["id"]: i for i, rule in enumerate(rules)}


def sarif_log(reports: Sequence[TargetReport]) -> dict[str, Any]:
    """The SARIF 2.1.0 log of ``reports``: one run, ok links left out."""
    log, rule_index = _envelope(reports)
    log["runs"][0]["results"] = list(_results(reports, rule_index))
    return log


_RESULTS_PLACEHOLDER = "crifs:results"


def write_sarif(reports: Sequence[TargetReport], out: TextIO | None = None) -> None:
    """Write the log indented, with each result on one line, as ``sarif_log`` builds it.

    The indenting encoder is pure Python (10x slower than the C one): it only gets the small
    envelope, and the results, which grow with the image, are encoded by the C encoder one at
    a time as they are made, so they are never all held at once.
    """
    out = out or sys.stdout
    log, rule_index = _envelope(reports)
    log["runs"][0]["results"] = _RESULTS_PLACEHOLDER
    envelope = json.dumps(log, ensure_ascii=False, indent=2)
    head, _, tail = envelope.partition(json.dumps(_RESULTS_PLACEHOLDER))
    encode = json.JSONEncoder(ensure_ascii=False).encode
    out.write(head + "[")
    separator = "\n        "
    wrote = False
    for result in _results(reports, rule_index):
        out.write(separator + encode(result))
        separator = ",\n        "
        wrote = True
    out.write(("\n      ]" if wrote else "]") + tail + "\n")
