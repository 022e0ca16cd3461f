"""The CSV table a benchmark writes (bench-kernels, and with --tp its collective cases): rows written as measured, so
that a run cut short keeps every finished row, and a run with ``resume`` measures only the rows the file lacks. A
call on a lent GPU has a time limit, and the whole row-kernel table takes longer than one call (about 700 s on an
H200, most of it Inductor's autotuning of its peer kernels)."""

from __future__ import annotations

import csv
from pathlib import Path

KEY = ("op", "hidden", "num_tokens")


class TableMismatch(ValueError):
    """The file to resume is not this table: other columns, or rows measured on another device or dtype."""


def row_key(row: dict) -> tuple[str, int, int]:
    return str(row["op"]), int(row["hidden"]), int(row["num_tokens"])


def _typed(text: str | None):
    """A CSV cell as the benchmark wrote it: '' -> None, then int, then float, else the text."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def earlier_rows(path: Path, fields: list[str], same: dict[str, object]) -> list[dict]:
    """The whole rows an earlier run wrote to ``path`` (typed as written), for a resumed run; [] where there is no
    such file. Every row must have the values ``same`` names (the device, the dtype: a table mixes neither), and the
    header must be ``fields``. The file is rewritten with those rows alone, so that a row torn by a killed run is
    dropped (and measured again) instead of having new rows appended after it."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(fields):
            raise TableMismatch(f"{path} has other columns than this benchmark writes (an older version's table, or "
                                "another benchmark's): write the table to a new --csv")
        rows = [row for row in reader if None not in row.values() and all(row.get(k) for k in KEY)]
    for row in rows:
        for field, value in same.items():
            if str(row[field]) != str(value):
                raise TableMismatch(f"{path} holds rows with {field} {row[field]!r}; this run's {field} is "
                                    f"{value!r}: resume a table on what it was measured with, or write a new --csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [{k: _typed(v) for k, v in row.items()} for row in rows]


def open_table(path: Path, fields: list[str], append: bool):
    """(file, csv writer) for the rows to come: a new table with its header, or after the rows already there."""
    path = Path(path)
    keep = append and path.exists() and path.stat().st_size > 0
    sink = open(path, "a" if keep else "w", newline="")
    writer = csv.DictWriter(sink, fieldnames=fields)
    if not keep:
        writer.writeheader()
    return sink, writer
