"""spa_ray.models.scoring: bucketed, right-padded batches equal per-sequence float64 forwards."""

from __future__ import annotations

import copy
import random

import pytest
import torch

try:
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer, torch_single_thread  # noqa: F401
except ImportError:
    from tests._tiny_model import make_tiny_llama, make_tiny_tokenizer, torch_single_thread  # noqa: F401

from spa_ray.models.scoring import (
    batched_policy_reference_logprobs,
    batched_sequence_logprobs,
    collate_right_padded,
    length_buckets,
)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_llama(tok, seed=0)


@pytest.fixture(scope="module")
def pairs(tok):
    rng = random.Random(0)
    V = len(tok)
    prompts, responses = [], []
    for _ in range(11):
        prompts.append([tok.bos_token_id] + [rng.randrange(4, V) for _ in range(rng.randint(1, 9))])
        responses.append([rng.randrange(4, V) for _ in range(rng.randint(1, 12))] + [tok.eos_token_id])
    return prompts, responses


def reference_logprobs(model, prompts, responses) -> torch.Tensor:
    """Direct float64 forward of each sequence alone (no padding, no batching)."""
    m64 = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(m64(input_ids=ids).logits[0], dim=-1)  # [L, V]
            total = sum(logp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r)))
            out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("budget", [1, 24, 64, 100_000])
def test_matches_unbatched_float64_reference(model, tok, pairs, budget):
    prompts, responses = pairs
    ref = reference_logprobs(model, prompts, responses)
    got = batched_sequence_logprobs(model, prompts, responses, tok.pad_token_id, max_tokens_per_batch=budget)
    assert got.dtype == torch.float32 and got.shape == (len(prompts),)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)


def test_results_in_input_order_under_permutation(model, tok, pairs):
    prompts, responses = pairs
    base = batched_sequence_logprobs(model, prompts, responses, tok.pad_token_id, max_tokens_per_batch=40)
    perm = list(range(len(prompts)))
    random.Random(1).shuffle(perm)
    shuffled = batched_sequence_logprobs(
        model, [prompts[i] for i in perm], [responses[i] for i in perm], tok.pad_token_id, max_tokens_per_batch=40
    )
    torch.testing.assert_close(shuffled, base[perm], atol=1e-5, rtol=0)


def test_pad_id_value_does_not_matter(model, tok, pairs):
    prompts, responses = pairs
    a = batched_sequence_logprobs(model, prompts, responses, tok.pad_token_id, max_tokens_per_batch=200)
    b = batched_sequence_logprobs(model, prompts, responses, tok.eos_token_id, max_tokens_per_batch=200)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_policy_and_reference_in_one_pass(model, tok, pairs):
    prompts, responses = pairs
    ref_model = make_tiny_llama(tok, seed=1)
    pol, ref = batched_policy_reference_logprobs(
        model, ref_model, prompts, responses, tok.pad_token_id, max_tokens_per_batch=50
    )
    torch.testing.assert_close(pol.double(), reference_logprobs(model, prompts, responses), atol=1e-4, rtol=0)
    torch.testing.assert_close(ref.double(), reference_logprobs(ref_model, prompts, responses), atol=1e-4, rtol=0)
    pol_only, none = batched_policy_reference_logprobs(model, None, prompts, responses, tok.pad_token_id)
    assert none is None
    torch.testing.assert_close(pol_only, pol, atol=1e-5, rtol=0)


def test_restores_training_mode(tok, pairs):
    m = make_tiny_llama(tok, seed=0)
    m.train()
    batched_sequence_logprobs(m, *pairs, tok.pad_token_id)
    assert m.training


def test_length_buckets_cover_and_respect_budget():
    lengths = [5, 17, 3, 3, 9, 30, 1, 12, 12, 8]
    for budget in (1, 10, 25, 40, 1000):
        for max_bs in (None, 2):
            batches = length_buckets(lengths, budget, max_bs)
            flat = sorted(i for b in batches for i in b)
            assert flat == list(range(len(lengths)))
            for b in batches:
                padded = len(b) * max(lengths[i] for i in b)
                assert padded <= budget or len(b) == 1
                assert max_bs is None or len(b) <= max_bs
    # longest first, similar lengths together
    assert length_buckets(lengths, 40) [0] == [5]
    assert length_buckets([], 10) == []
    with pytest.raises(ValueError):
        length_buckets(lengths, 0)


def test_collate_right_padded_layout():
    ids, am, rm = collate_right_padded([[1, 2], [3]], [[4], [5, 6, 7]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert am.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert rm.tolist() == [[False, False, True, False], [False, True, True, True]]


def test_rejects_empty_and_mismatched(model, tok):
    with pytest.raises(ValueError, match="empty response"):
        batched_sequence_logprobs(model, [[2, 4]], [[]], tok.pad_token_id)
    with pytest.raises(ValueError, match="empty prompt"):
        batched_sequence_logprobs(model, [[]], [[4]], tok.pad_token_id)
    with pytest.raises(ValueError, match="same length"):
        batched_sequence_logprobs(model, [[2]], [[4], [5]], tok.pad_token_id)
    assert batched_sequence_logprobs(model, [], [], tok.pad_token_id).shape == (0,)
