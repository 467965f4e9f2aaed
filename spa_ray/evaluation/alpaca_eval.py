"""Model outputs in AlpacaEval's format, written atomically.

AlpacaEval reads a JSON list of records ``{"instruction", "output", "generator",
"dataset"?}`` (``generator`` names the model; ``dataset`` is optional, e.g.
"helpful_base"). The file is written to a temporary name in the same directory, fsynced
and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from spa_ray.atomic_files import atomic_write_text

__all__ = ["alpaca_eval_records", "write_alpaca_eval_outputs", "read_alpaca_eval_outputs", "atomic_write_text"]


def alpaca_eval_records(
    instructions: Sequence[str],
    outputs: Sequence[str],
    generator: str,
    dataset: str | Sequence[str] | None = None,
) -> list[dict]:
    """Records in AlpacaEval's format; `dataset` may be one name or one per record."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    if not isinstance(generator, str) or not generator:
        raise ValueError("generator must be a non-empty string (the model's name)")
    if dataset is not None and not isinstance(dataset, str) and len(dataset) != len(instructions):
        raise ValueError(f"dataset has {len(dataset)} entries for {len(instructions)} instructions")
    records = []
    for i, (ins, out) in enumerate(zip(instructions, outputs)):
        if not isinstance(ins, str) or not isinstance(out, str):
            raise TypeError(f"record {i}: instruction and output must be str")
        rec = {"instruction": ins, "output": out, "generator": generator}
        if dataset is not None:
            rec["dataset"] = dataset if isinstance(dataset, str) else dataset[i]
        records.append(rec)
    return records


def write_alpaca_eval_outputs(
    path: str | os.PathLike,
    instructions: Sequence[str],
    outputs: Sequence[str],
    generator: str,
    dataset: str | Sequence[str] | None = None,
) -> Path:
    """Write the AlpacaEval JSON list to `path` atomically; returns the path."""
    records = alpaca_eval_records(instructions, outputs, generator, dataset)
    return atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=2) + "\n")


def read_alpaca_eval_outputs(path: str | os.PathLike) -> list[dict]:
    """Read an AlpacaEval outputs file back, checking the required keys."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(records).__name__}")
    for i, rec in enumerate(records):
        missing = {"instruction", "output", "generator"} - set(rec)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
    return records
