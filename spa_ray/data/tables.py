"""Parquet and JSON files of a run: small helpers so stages read as data flow, not I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def rows_to_columns(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, list]:
    keys = list(keys if keys is not None else (rows[0].keys() if rows else []))
    return {k: [row[k] for row in rows] for k in keys}


def write_parquet(path: str | Path, columns: dict[str, Sequence[Any]]) -> None:
    pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), str(path))


def read_parquet(path: str | Path) -> dict[str, list]:
    table = pq.read_table(str(path))
    return {name: table.column(name).to_pylist() for name in table.column_names}


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
