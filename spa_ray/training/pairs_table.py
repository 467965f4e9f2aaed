"""Token-level preference pairs on disk: what the trainer group reads.

Self-generated pairs keep the generator's exact token ids (re-tokenising decoded text
can change them); gold pairs are tokenised once by the driver. Both land in one parquet
schema, so the trainer has one input format: ``prompt_ids``, ``chosen_ids``,
``rejected_ids`` (response ids, EOS included where the response ended), plus any
per-pair columns (scores, labels) carried along for the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from spa_ray.data.records import PreferencePair
from spa_ray.data.tokenize import tokenize_preference_pair

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def write_pairs(path: str | Path, columns: dict[str, Sequence[Any]]) -> None:
    """Write a pairs table; ``columns`` must hold the three id columns of equal length."""
    missing = [c for c in ID_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"pairs table {path}: missing columns {missing}")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"pairs table {path}: columns differ in length {lengths}")
    table = pa.table({name: list(values) for name, values in columns.items()})
    pq.write_table(table, str(path))


def read_pairs(path: str | Path) -> dict[str, list]:
    table = pq.read_table(str(path))
    missing = [c for c in ID_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"pairs table {path}: missing columns {missing}")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def tokenize_gold_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], *, max_prompt_len: int, max_total_len: int
) -> dict[str, list]:
    """Gold (text) pairs -> the token-level table columns, keeping the text for the record."""
    columns: dict[str, list] = {c: [] for c in ("prompt", "chosen", "rejected", *ID_COLUMNS, "truncated_tokens")}
    for pair in pairs:
        tok = tokenize_preference_pair(tokenizer, pair, max_prompt_len=max_prompt_len, max_total_len=max_total_len)
        # tokens cut by the length limits (prompt once, each response): counted, never silent
        columns["truncated_tokens"].append(
            tok.chosen.prompt_truncated + tok.chosen.response_truncated + tok.rejected.response_truncated
        )
        columns["prompt"].append(pair.prompt)
        columns["chosen"].append(pair.chosen)
        columns["rejected"].append(pair.rejected)
        columns["prompt_ids"].append(tok.chosen.prompt_ids)
        columns["chosen_ids"].append(tok.chosen.response_ids)
        columns["rejected_ids"].append(tok.rejected.response_ids)
    return columns
