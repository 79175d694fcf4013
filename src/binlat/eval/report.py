"""Evaluation reports: one JSON layout and one plain-text table printer shared by every `binlat eval`.

A report is a JSON object::

    {"kind": "reconstruction" | "shapes" | "clip-score" | "fid",
     "model": what was evaluated (a path, or null),
     "arguments": every option the evaluation ran with,
     "summary": the headline figures,
     "items": one entry per evaluated image,
     "tables": [{"title", "columns", "rows"}]   (exactly what was printed, as text cells),
     "timestamp": ISO 8601 UTC, "binlat_version": ...}

Only measured figures go in; nothing is hard-coded. JSON has no infinity, so a non-finite float is written as the
string "inf", "-inf" or "nan" (an identical reconstruction has infinite PSNR).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_KEYS = ("kind", "model", "arguments", "summary", "items", "tables", "timestamp", "binlat_version")


def format_value(value: Any) -> str:
    """The one way a figure is shown in a table: floats with 4 decimals (1 from 100 up), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def make_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A table as text cells (every figure through :func:`format_value`)."""
    cells = [[format_value(v) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(columns):
            raise ValueError(f"table {title!r}: a row has {len(row)} cells for {len(columns)} columns")
    return {"title": title, "columns": list(columns), "rows": cells}


def render_table(table: Mapping[str, Any], indent: str = "") -> str:
    """Aligned plain text: the title, the table's `notes` lines if it has any, a header, a rule, the rows (first
    column left, others right), then its `footer` lines if any; every line after the title starts with `indent`."""
    columns, rows = list(table["columns"]), [[str(c) for c in r] for r in table["rows"]]
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    body = [*table.get("notes", ()), line(columns), "  ".join("-" * w for w in widths)]
    body += [line(r) for r in rows] + list(table.get("footer", ()))
    return "\n".join([str(table["title"])] + [indent + b for b in body])


def print_tables(tables: Sequence[Mapping[str, Any]], file: Any = None) -> None:
    import sys

    stream = file or sys.stdout
    for i, table in enumerate(tables):
        if i:
            print(file=stream)
        print(render_table(table), file=stream)


def parse_table(text: str) -> list[list[str]]:
    """Rows (header included) of a table printed by :func:`render_table`, split on runs of 2+ spaces;
    for tests and scripts that read the printed figures back."""
    import re

    lines = text.strip("\n").splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:] if line.strip() and set(line.strip()) - {"-", " "}]


def json_safe(value: Any) -> Any:
    """Plain JSON values: tuples to lists, paths to strings, non-finite floats to 'inf' / '-inf' / 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())  # numpy / torch scalars
    return value


def make_report(
    kind: str,
    model: str | None,
    arguments: Mapping[str, Any],
    summary: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]],
    tables: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    from binlat import __version__ as version  # noqa: PLC0415

    report = {
        "kind": kind,
        "model": None if model is None else str(model),
        "arguments": dict(arguments),
        "summary": dict(summary),
        "items": list(items),
        "tables": list(tables),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "binlat_version": version,
    }
    return json_safe(report)


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report atomically as indented JSON (strict: no NaN/Infinity literals)."""
    from binlat.io import atomic_write_bytes  # noqa: PLC0415

    path = Path(path)
    text = json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise OSError(f"cannot write report {path}: {e.strerror or e}") from None
    return path


def report_path(json_path: str | Path | None, out: str | Path, kind: str) -> Path:
    """--json FILE, else <out>/report-<kind>.json."""
    return Path(json_path) if json_path else Path(out) / f"report-{kind}.json"
