"""Right-padded preference batches, left-padded prompt batches, length bucketing."""

from __future__ import annotations

import random

import pytest
import torch

from spa_ray.data import (
    PreferencePair,
    bucket_by_length,
    collate_preference_pairs,
    collate_prompts,
    tokenize_preference_pair,
    tokenize_prompts,
)

try:
    from tests._tiny_tokenizer import make_tiny_tokenizer
except ImportError:
    from _tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def items(tok):
    pairs = [
        PreferencePair("Hi?", "Hello there, how can I help you today?", "No."),
        PreferencePair("Explain photosynthesis in one sentence.", "Plants make sugar from light.", "Plants eat dirt to grow."),
        PreferencePair("2+2?", "4", "5"),
    ]
    return [tokenize_preference_pair(tok, p) for p in pairs]


def test_preference_batch_shapes_and_padding(tok, items):
    pad = tok.pad_token_id
    batch = collate_preference_pairs(items, pad)
    T = max(len(it) for it in items)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "response_mask")}
    for k, v in batch.items():
        assert v.shape == (3, T), k
    for side in ("chosen", "rejected"):
        ids, att, resp = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_response_mask"]
        assert ids.dtype == torch.long and att.dtype == torch.long and resp.dtype == torch.bool
        for i, it in enumerate(items):
            seq = getattr(it, side)
            n = len(seq)
            assert ids[i, :n].tolist() == seq.input_ids  # right padding: content first
            assert (ids[i, n:] == pad).all()
            assert att[i].tolist() == [1] * n + [0] * (T - n)
            assert resp[i, :n].tolist() == seq.response_mask and not resp[i, n:].any()
            assert int(resp[i].sum()) == seq.response_len
            assert not (resp[i] & (att[i] == 0)).any()


def test_pad_to_multiple_of(tok, items):
    batch = collate_preference_pairs(items, tok.pad_token_id, pad_to_multiple_of=16)
    assert batch["chosen_input_ids"].shape[1] % 16 == 0
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape


def test_collate_errors(items):
    with pytest.raises(ValueError):
        collate_preference_pairs([], 0)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate_preference_pairs(items, None)


def test_prompt_batch_is_left_padded(tok):
    prompts = tokenize_prompts(tok, ["Hi?", "Explain photosynthesis in one sentence, please."])
    batch = collate_prompts(prompts, tok.pad_token_id)
    T = max(map(len, prompts))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, T)
    for i, p in enumerate(prompts):
        assert batch["input_ids"][i, T - len(p):].tolist() == p
        assert (batch["input_ids"][i, : T - len(p)] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [0] * (T - len(p)) + [1] * len(p)
    # every row ends with the generation prompt, so new tokens append at the same column
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()
    with pytest.raises(ValueError):
        collate_prompts([[1, 2], []], 0)


def _check_buckets(lengths, budget, batches, max_batch_size=None):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each index exactly once
    for b in batches:
        cost = len(b) * max(max(lengths[i], 1) for i in b)
        assert cost <= budget or len(b) == 1
        if max_batch_size:
            assert len(b) <= max_batch_size


def test_bucket_by_length_partitions_and_respects_budget():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(0, 200)
        lengths = [rng.randint(0, 300) for _ in range(n)]
        budget = rng.choice([64, 300, 1000, 4096])
        mbs = rng.choice([None, 1, 7])
        batches = bucket_by_length(lengths, budget, max_batch_size=mbs)
        _check_buckets(lengths, budget, batches, mbs)
        assert batches == bucket_by_length(lengths, budget, max_batch_size=mbs)  # deterministic


def test_bucket_by_length_groups_similar_lengths_and_wastes_little():
    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    budget = 4096
    batches = bucket_by_length(lengths, budget)
    _check_buckets(lengths, budget, batches)
    # batches are contiguous runs of the sorted lengths: ranges do not interleave
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    for (lo1, _), (_, hi2) in zip(spans, spans[1:]):
        assert hi2 <= lo1
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.05
    # naive fixed-size batches in input order waste far more
    k = len(batches[len(batches) // 2])
    naive = sum(len(lengths[s:s + k]) * max(lengths[s:s + k]) for s in range(0, len(lengths), k))
    assert naive > 1.3 * padded


def test_bucket_by_length_oversized_alone_and_errors():
    batches = bucket_by_length([10, 5000, 10, 10], 100)
    assert [1] in batches
    _check_buckets([10, 5000, 10, 10], 100, batches)
    assert bucket_by_length([], 100) == []
    with pytest.raises(ValueError):
        bucket_by_length([1, 2], 0)
    with pytest.raises(ValueError):
        bucket_by_length([1, -2], 10)
