"""Implicit-reward judge (Eq. 7-8, 13) against float64 references; ties; length penalty."""

from __future__ import annotations

import math

import pytest
import torch

from spa_ray.judging import implicit_reward, label_pairs
from spa_ray.objectives import response_lengths, sequence_logprobs


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def logps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 30 - 80, torch.randn(n, generator=g) * 30 - 80


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_implicit_reward_reference(n, beta):
    pol, ref = logps(n, seed=n)
    lengths = torch.randint(1, 300, (n,))
    got = implicit_reward(pol, ref, beta)
    want = [beta * (float(p) - float(r)) for p, r in zip(pol, ref)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert implicit_reward(pol, None, beta).tolist() == pytest.approx([beta * float(p) for p in pol], rel=1e-12)
    got_lp = implicit_reward(pol, ref, beta, response_lengths=lengths, length_penalty=0.01)
    want_lp = [w - 0.01 * int(L) for w, L in zip(want, lengths)]
    assert got_lp.tolist() == pytest.approx(want_lp, rel=1e-12, abs=1e-12)


def test_label_pairs_reference_and_ties():
    r1 = torch.tensor([1.0, -2.0, 0.3, 5.0, 0.0, -1e-3], dtype=torch.float64)
    r2 = torch.tensor([0.5, -1.0, 0.3, 5.0, 1e-20, 0.0], dtype=torch.float64)
    lab = label_pairs(r1, r2)
    assert lab.is_tie.tolist() == [False, False, True, True, False, False]
    assert lab.num_ties == 2 and lab.keep.tolist() == [True, True, False, False, True, True]
    assert lab.first_is_chosen.tolist() == [True, False, False, False, False, False]
    want_p = [sigmoid(a - b) for a, b in zip(r1.tolist(), r2.tolist())]
    assert lab.probability.tolist() == pytest.approx(want_p, rel=1e-12)  # p(y1 > y2), not reordered
    assert lab.probability[2].item() == 0.5 and lab.probability[3].item() == 0.5
    # r1 < r2 by 1e-20: sigma rounds to 0.5 but it is one-sided, not a tie
    assert lab.probability[4].item() == 0.5 and not lab.is_tie[4]
    want_chosen = [max(p, 1 - p) for p in want_p]
    assert lab.chosen_probability.tolist() == pytest.approx(want_chosen, rel=1e-12)
    assert (lab.chosen_probability >= 0.5).all()


def test_identical_responses_tie_from_logits():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    pol_logits = torch.randn(B, T, V, generator=g)
    ref_logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:8] = True
    ids2 = ids.clone()
    ids2[1, 5] = (ids[1, 5] + 1) % V  # row 1 differs, rows 0 and 2 are identical responses
    r1 = implicit_reward(sequence_logprobs(pol_logits, ids, mask), sequence_logprobs(ref_logits, ids, mask), 0.1)
    r2 = implicit_reward(sequence_logprobs(pol_logits, ids2, mask), sequence_logprobs(ref_logits, ids2, mask), 0.1)
    lab = label_pairs(r1, r2)
    assert lab.is_tie.tolist() == [True, False, True] and lab.num_ties == 2


def test_length_penalty_flips_the_label():
    pol = torch.tensor([-50.0, -60.0])
    ref = torch.tensor([-55.0, -60.0])
    # y1: reward 0.5, 200 tokens; y2: reward 0.0, 20 tokens
    ra = implicit_reward(pol[:1], ref[:1], 0.1, torch.tensor([200]), 0.0)
    rb = implicit_reward(pol[1:], ref[1:], 0.1, torch.tensor([20]), 0.0)
    assert label_pairs(ra, rb).first_is_chosen.tolist() == [True]
    ra = implicit_reward(pol[:1], ref[:1], 0.1, torch.tensor([200]), 0.01)  # 0.5 - 2.0
    rb = implicit_reward(pol[1:], ref[1:], 0.1, torch.tensor([20]), 0.01)  # 0.0 - 0.2
    assert label_pairs(ra, rb).first_is_chosen.tolist() == [False]
    ra = implicit_reward(pol[:1], ref[:1], 0.1, torch.tensor([200]), 0.001)  # 0.5 - 0.2 > -0.02
    rb = implicit_reward(pol[1:], ref[1:], 0.1, torch.tensor([20]), 0.001)
    assert label_pairs(ra, rb).first_is_chosen.tolist() == [True]
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    assert response_lengths(mask).tolist() == [3, 2]


def test_ref_none_is_raw_likelihood_judge():
    pol1, pol2 = torch.tensor([-10.0, -30.0]), torch.tensor([-20.0, -5.0])
    lab = label_pairs(implicit_reward(pol1, None, 0.1), implicit_reward(pol2, None, 0.1))
    assert lab.first_is_chosen.tolist() == [True, False]
    assert lab.probability.tolist() == pytest.approx([sigmoid(1.0), sigmoid(-2.5)])


def test_judge_outputs_carry_no_gradient():
    pol = torch.randn(4, requires_grad=True)
    ref = torch.randn(4, requires_grad=True)
    r = implicit_reward(pol, ref, 0.1)
    assert not r.requires_grad
    lab = label_pairs(r, implicit_reward(pol * 2, ref, 0.1))
    assert not any(t.requires_grad for t in lab)


def test_judging_errors():
    pol, ref = logps(3, seed=1)
    with pytest.raises(ValueError, match="beta"):
        implicit_reward(pol, ref, 0.0)
    with pytest.raises(ValueError, match="length_penalty"):
        implicit_reward(pol, ref, 0.1, torch.tensor([1, 2, 3]), -0.01)
    with pytest.raises(ValueError, match="response_lengths is required"):
        implicit_reward(pol, ref, 0.1, None, 0.01)
    with pytest.raises(ValueError, match=r"policy_logps=\(3,\), ref_logps=\(2,\)"):
        implicit_reward(pol, ref[:2], 0.1)
    with pytest.raises(ValueError, match=r"response_lengths=\(2,\)"):
        implicit_reward(pol, ref, 0.1, torch.tensor([1, 2]), 0.01)
    with pytest.raises(ValueError, match=r"negative in rows \[1\]"):
        implicit_reward(pol, ref, 0.1, torch.tensor([1, -2, 3]), 0.01)
    with pytest.raises(ValueError, match=r"reward_1=\(3,\), reward_2=\(2,\)"):
        label_pairs(pol, ref[:2])
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        label_pairs(pol, torch.tensor([0.0, 1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        label_pairs(pol[None], ref[None])
