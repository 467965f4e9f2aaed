"""Batching: right-padded preference batches for training, left-padded prompt batches for
generation, and length bucketing.

Conventions (docs/dev/CONTRACT.md): ``input_ids`` LongTensor ``[B, T]``, ``attention_mask``
LongTensor 0/1, ``response_mask`` BoolTensor, both masks 0/False on padding. Chosen and
rejected are padded to the SAME length T so a trainer can ``torch.cat`` them into one
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokenize import TokenizedPair, TokenizedSequence

__all__ = ["pad_sequences", "collate_preference_pairs", "collate_prompts", "bucket_by_length"]


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None or multiple <= 1:
        return n
    return ((n + multiple - 1) // multiple) * multiple


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    pad_value: int | bool,
    *,
    side: str = "right",
    length: int | None = None,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack variable-length sequences into ``[B, length or max_len]`` padded on ``side``."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    max_len = max((len(s) for s in seqs), default=0)
    T = max_len if length is None else length
    if T < max_len:
        raise ValueError(f"length={T} is shorter than the longest sequence ({max_len})")
    out = torch.full((len(seqs), T), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        t = torch.as_tensor(list(s), dtype=dtype)
        if side == "right":
            out[i, : len(s)] = t
        else:
            out[i, T - len(s) :] = t
    return out


def collate_preference_pairs(
    items: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch ``{chosen,rejected}_{input_ids,attention_mask,response_mask}``,
    all ``[B, T]`` with one T for both sides (the longest sequence, rounded up to
    ``pad_to_multiple_of``)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to eos) first")
    T = _round_up(max(len(it) for it in items), pad_to_multiple_of)
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        seqs: list[TokenizedSequence] = [getattr(it, side) for it in items]
        batch[f"{side}_input_ids"] = pad_sequences([s.input_ids for s in seqs], int(pad_token_id), length=T)
        batch[f"{side}_attention_mask"] = pad_sequences([s.attention_mask for s in seqs], 0, length=T)
        batch[f"{side}_response_mask"] = pad_sequences(
            [s.response_mask for s in seqs], False, length=T, dtype=torch.bool
        )
    return batch


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """LEFT-padded prompt batch for generation: ``{input_ids, attention_mask}`` ``[B, T]``;
    the last column holds every prompt's last token, so new tokens append on the right."""
    if not prompt_ids:
        raise ValueError("cannot collate an empty batch")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt in generation batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to eos) first")
    T = _round_up(max(len(p) for p in prompt_ids), pad_to_multiple_of)
    return {
        "input_ids": pad_sequences(prompt_ids, int(pad_token_id), side="left", length=T),
        "attention_mask": pad_sequences([[1] * len(p) for p in prompt_ids], 0, side="left", length=T),
    }


def bucket_by_length(
    lengths: Sequence[int],
    max_tokens_per_batch: int,
    *,
    max_batch_size: int | None = None,
) -> list[list[int]]:
    """Group indices into batches of similar length with ``len(batch) * max(len) <=
    max_tokens_per_batch`` (the padded size), and at most ``max_batch_size`` items.

    Indices are sorted by length, longest first (an out-of-memory shows up in the first
    batch), ties in index order, and cut greedily: deterministic, and every index appears
    in exactly one batch. A sequence longer than ``max_tokens_per_batch`` forms a batch of
    its own rather than being dropped. Indices inside a batch are in that sorted order.
    """
    if max_tokens_per_batch < 1:
        raise ValueError("max_tokens_per_batch must be >= 1")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    if any(int(n) < 0 for n in lengths):
        raise ValueError("lengths must be >= 0")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        new_max = max(cur_max, n)
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and (full or (len(cur) + 1) * new_max > max_tokens_per_batch):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches
