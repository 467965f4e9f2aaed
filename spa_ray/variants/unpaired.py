"""SSPO's unpaired pool: single responses without a partner, as a token-level table.

Two sources (``variant.sspo.unpaired_source``):
- ``sft``: the task's SFT demonstrations (``Task.sft_demonstrations``), minus any whose
  prompt is in the evaluation set, tokenised with the project's one prompt encoding;
- ``self``: an iteration's own samples beyond the first two per prompt (the pair uses
  those two), keeping the generator's exact token ids.
The table (``unpaired.parquet``) has ``prompt_ids``, ``response_ids`` and the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def write_unpaired(path: str | Path, columns: dict[str, Sequence[Any]]) -> None:
    for c in ("prompt_ids", "response_ids"):
        if c not in columns:
            raise ValueError(f"unpaired table {path}: missing column {c!r}")
    pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), str(path))


def read_unpaired(path: str | Path) -> dict[str, list]:
    table = pq.read_table(str(path))
    for c in ("prompt_ids", "response_ids"):
        if c not in table.column_names:
            raise ValueError(f"unpaired table {path}: missing column {c!r}")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def sft_unpaired(task: Any, tokenizer: Any, n: int, *, seed: int, exclude_prompts: set[str],
                 max_prompt_len: int, max_total_len: int) -> dict[str, list]:
    """``n`` SFT demonstrations (evaluation prompts excluded) as unpaired table columns."""
    from spa_ray.data.tokenize import tokenize_pair

    try:
        demos = task.sft_demonstrations(n=int(n * 1.2) + 8, seed=seed)
    except NotImplementedError as exc:
        raise ValueError(
            f"variant.sspo.unpaired_source=sft: task {getattr(task, 'name', task)!r} has no SFT demonstrations "
            f"({exc}); use unpaired_source=self"
        ) from None
    cols: dict[str, list] = {"prompt": [], "response": [], "prompt_ids": [], "response_ids": []}
    for d in demos:
        if d.prompt in exclude_prompts:
            continue
        tok = tokenize_pair(tokenizer, d.prompt, d.response, max_prompt_len=max_prompt_len, max_total_len=max_total_len)
        cols["prompt"].append(d.prompt)
        cols["response"].append(d.response)
        cols["prompt_ids"].append(tok.prompt_ids)
        cols["response_ids"].append(tok.response_ids)
        if len(cols["prompt"]) >= n:
            break
    return cols


def self_unpaired(generations: dict[str, list], n: int = 0) -> dict[str, list]:
    """Samples with sample_index >= 2 (the pair takes 0 and 1); first ``n`` of them (0 = all)."""
    cols: dict[str, list] = {"prompt": [], "response": [], "prompt_ids": [], "response_ids": []}
    for i, k in enumerate(generations["sample_index"]):
        if k < 2:
            continue
        cols["prompt"].append(generations["prompt"][i])
        cols["response"].append(generations["text"][i])
        cols["prompt_ids"].append(generations["prompt_ids"][i])
        cols["response_ids"].append(generations["response_ids"][i])
        if n and len(cols["prompt"]) >= n:
            break
    return cols


__all__ = ["read_unpaired", "self_unpaired", "sft_unpaired", "write_unpaired"]
