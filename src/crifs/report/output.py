"""Writing one command's result: a table, a JSON or YAML document, or Graphviz dot.

Every JSON/YAML document is an object ``{"schema": "crifs/<kind>/v1", <list name>: [...]}`` so
fields can be added without breaking readers. Data goes to stdout only; nothing else is mixed in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from crifs.report.values import escape_text


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"
    DOT = "dot"
    SARIF = "sarif"  # link audits only (crifs links)


def document(kind: str, list_name: str, records: list[Any], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": f"crifs/{kind}/v1"}
    doc.update(extra)
    doc[list_name] = records
    return doc


def write_document(doc: dict[str, Any], fmt: Format, out: TextIO | None = None) -> None:
    """Write ``doc`` as YAML, or as JSON with one record per line.

    One compact record per line keeps the C JSON encoder (``indent`` forces the pure-Python
    one, 10x slower on 10,000 snapshots) while staying readable and ``grep``-able.
    """
    out = out or sys.stdout
    if fmt is Format.YAML:
        import yaml

        yaml.safe_dump(doc, out, sort_keys=False, allow_unicode=True, width=10**6)
        return
    encode = _row_encoder()
    parts = ["{"]
    items = list(doc.items())
    for n, (name, value) in enumerate(items):
        sep = "," if n < len(items) - 1 else ""
        key = encode(name)
        if isinstance(value, list) and value:
            rows = ",\n    ".join(encode(v) for v in value)
            parts.append(f"\n  {key}: [\n    {rows}\n  ]{sep}")
        else:
            parts.append(f"\n  {key}: {encode(value)}{sep}")
    parts.append("\n}\n")
    out.write("".join(parts))


def _row_encoder() -> Callable[[Any], str]:
    """``json.JSONEncoder(ensure_ascii=False).encode``, minus its per-call set-up.

    ``encode`` builds a new C encoder for every call; with one call per record that set-up
    costs as much as the encoding itself. The C encoder is built once here (same arguments
    ``JSONEncoder.iterencode`` passes), falling back to ``encode`` where it does not exist.
    """
    encoder = json.JSONEncoder(ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    one_shot = make({}, encoder.default, json.encoder.encode_basestring, None,
                    encoder.key_separator, encoder.item_separator, encoder.sort_keys,
                    encoder.skipkeys, encoder.allow_nan)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return json.encoder.encode_basestring(value)
        return "".join(one_shot(value, 0))

    return encode


@dataclass
class Table:
    """Columns and rows of text; rendered with rich on a terminal, as plain aligned text else."""

    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    title: str | None = None

    def add(self, *cells: object) -> None:
        self.rows.append([escape_text("" if c is None else str(c)) for c in cells])

    def render(self, out: TextIO | None = None) -> None:
        out = out or sys.stdout
        if out.isatty():
            from rich.console import Console
            from rich.table import Table as RichTable

            table = RichTable(title=self.title, box=None, header_style="bold", pad_edge=False)
            for name in self.columns:
                table.add_column(name, overflow="fold")
            for row in self.rows:
                table.add_row(*row)
            Console(file=out).print(table)
            return
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
        for row in [list(self.columns), *self.rows]:
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            out.write("  ".join(cells).rstrip() + "\n")
