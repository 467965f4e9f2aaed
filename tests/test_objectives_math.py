"""Layer-1 SPA math against independent float64 references (explicit Python loops).

The references below never call spa_ray code: they recompute log_softmax, sums, sigmoids
with `math` on Python floats, row by row and token by token.
"""

from __future__ import annotations

import math

import pytest
import torch

from spa_ray.objectives import (
    ConfidenceWindow,
    decoupled_confidence,
    dpo_loss,
    dpo_margin,
    extrapolated_sequence_logprobs,
    lambda_for_iteration,
    refined_dpo_loss,
    response_lengths,
    sequence_logprobs,
    token_logprobs,
)

SHAPES = [(1, 4, 5), (3, 7, 11), (5, 12, 17)]


# ----------------------------------------------------------------------------- helpers
def make_batch(B, T, V, seed, dtype=torch.float32, pad_id=-100):
    """Right-padded rows: prompt of varying length, then a response, then padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = int(torch.randint(1, T - 1, (1,), generator=g))  # prompt length >= 1
        r = int(torch.randint(1, T - p + 1, (1,), generator=g))  # response length >= 1
        mask[b, p : p + r] = True
        ids[b, p + r :] = pad_id  # padding ids that would break a naive gather
    ids[0, -1] = pad_id if not mask[0, -1] else ids[0, -1]
    return logits, ids, mask


def ref_logsoftmax_at(row, k):
    m = max(row)
    return row[k] - (m + math.log(sum(math.exp(x - m) for x in row)))


def ref_token_logprobs(logits, ids, mask):
    L = logits.double().tolist()
    out = []
    for b in range(len(L)):
        out.append([ref_logsoftmax_at(L[b][t - 1], int(ids[b, t])) if mask[b, t] else 0.0 for t in range(1, len(L[b]))])
    return out


def ref_seq_logprobs(logits, ids, mask):
    return [sum(r) for r in ref_token_logprobs(logits, ids, mask)]


def ref_extrapolated(pl, rl, ids, mask, lam):
    P, R = pl.double().tolist(), rl.double().tolist()
    out = []
    for b in range(len(P)):
        s = 0.0
        for t in range(1, len(P[b])):
            if mask[b, t]:
                h = [(1 + lam) * a - lam * c for a, c in zip(P[b][t - 1], R[b][t - 1])]
                s += ref_logsoftmax_at(h, int(ids[b, t]))
        out.append(s)
    return out


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def close(a, b, tol=1e-5):
    a = a.tolist() if isinstance(a, torch.Tensor) else a
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tol * (1 + abs(y)), (a, b)


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_logprobs_matches_reference(B, T, V, dtype):
    logits, ids, mask = make_batch(B, T, V, seed=B * 100 + T, dtype=dtype)
    got = sequence_logprobs(logits, ids, mask)
    assert got.shape == (B,) and got.dtype == dtype
    close(got, ref_seq_logprobs(logits, ids, mask), 1e-12 if dtype == torch.float64 else 1e-5)
    tok = token_logprobs(logits, ids, mask)
    assert tok.shape == (B, T - 1)
    for row_got, row_ref in zip(tok.tolist(), ref_token_logprobs(logits, ids, mask)):
        close(row_got, row_ref, 1e-5)


def test_half_precision_logits_computed_in_float32():
    logits, ids, mask = make_batch(3, 9, 13, seed=7, dtype=torch.bfloat16)
    got = sequence_logprobs(logits, ids, mask)
    assert got.dtype == torch.float32
    close(got, ref_seq_logprobs(logits, ids, mask), 1e-5)  # reference uses the same bf16 values


def test_token_logprobs_without_mask_scores_every_next_token():
    logits, _, _ = make_batch(2, 6, 7, seed=3)
    ids = torch.randint(0, 7, (2, 6))
    full = torch.ones(2, 6, dtype=torch.bool)
    full[:, 0] = False
    close(token_logprobs(logits, ids).flatten(), sum(ref_token_logprobs(logits, ids, full), []))


def test_masking_invariance_prompt_and_padding_change_nothing():
    B, T, V = 4, 10, 9
    logits, ids, mask = make_batch(B, T, V, seed=11)
    base = sequence_logprobs(logits, ids, mask)
    g = torch.Generator().manual_seed(5)
    ids2, logits2 = ids.clone(), logits.clone()
    ids2[~mask] = torch.randint(-200, 200, (int((~mask).sum()),), generator=g)  # prompt + pad ids, even invalid
    predicts_masked = torch.zeros(B, T, dtype=torch.bool)
    predicts_masked[:, :-1] = ~mask[:, 1:]
    predicts_masked[:, -1] = True  # the last position predicts nothing
    logits2[predicts_masked] = torch.randn(int(predicts_masked.sum()), V, generator=g) * 50
    assert torch.equal(sequence_logprobs(logits2, ids2, mask), base)
    lam_base = extrapolated_sequence_logprobs(logits, logits * 0.5, ids, mask, 0.5, chunk_size=3)
    lam_new = extrapolated_sequence_logprobs(logits2, logits2 * 0.5, ids2, mask, 0.5, chunk_size=3)
    assert torch.allclose(lam_base, lam_new, atol=0, rtol=0)
    # and a change at a response position does change the result
    b, t = torch.nonzero(mask)[0].tolist()
    logits3 = logits.clone()
    logits3[b, t - 1] += torch.randn(V, generator=g)
    assert not torch.equal(sequence_logprobs(logits3, ids, mask)[b], base[b])


def test_integer_masks_and_response_lengths():
    logits, ids, mask = make_batch(3, 8, 5, seed=2)
    assert torch.equal(sequence_logprobs(logits, ids, mask.long()), sequence_logprobs(logits, ids, mask))
    assert response_lengths(mask).tolist() == [int(mask[b, 1:].sum()) for b in range(3)]


def test_sequence_logprobs_errors():
    logits, ids, mask = make_batch(3, 8, 5, seed=1)
    with pytest.raises(ValueError, match=r"logits \(3, 7, 5\).*input_ids \(3, 8\)"):
        sequence_logprobs(logits[:, :7], ids, mask)
    with pytest.raises(ValueError, match=r"response_mask \(3, 7\)"):
        sequence_logprobs(logits, ids, mask[:, :7])
    empty = mask.clone()
    empty[0] = False
    empty[2] = False
    with pytest.raises(ValueError, match=r"no response token in rows \[0, 2\]"):
        sequence_logprobs(logits, ids, empty)
    with pytest.raises(ValueError, match="only 0/1"):
        sequence_logprobs(logits, ids, mask.long() * 2)
    first = mask.clone()
    first[1, 0] = True
    with pytest.raises(ValueError, match=r"position 0.*rows \[1\]"):
        sequence_logprobs(logits, ids, first)
    oov = ids.clone()
    b, t = torch.nonzero(mask)[0].tolist()
    oov[b, t] = 5
    with pytest.raises(ValueError, match=rf"outside \[0, 5\).*rows \[{b}\]"):
        sequence_logprobs(logits, oov, mask)
    with pytest.raises(ValueError, match="3-D"):
        sequence_logprobs(logits[0], ids, mask)
    with pytest.raises(ValueError, match="integer"):
        sequence_logprobs(logits, ids.float(), mask)
    with pytest.raises(ValueError, match="required"):
        sequence_logprobs(logits, ids, None)


# ----------------------------------------------------------------------------- DPO / refined
def rand_logps(B, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, generator=g, dtype=torch.float64) * 20 - 50) for _ in range(4)]


def ref_margin(pc, pr, rc, rr, beta):
    return [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]


@pytest.mark.parametrize("B", [1, 6, 33])
@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_dpo_margin_and_loss(B, beta):
    pc, pr, rc, rr = rand_logps(B, seed=B)
    m = dpo_margin(pc, pr, rc, rr, beta)
    close(m, ref_margin(pc, pr, rc, rr, beta), 1e-12)
    close(dpo_loss(m), [-log_sigmoid(x) for x in m.tolist()], 1e-12)


def test_dpo_loss_stable_for_large_margins():
    m = torch.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    loss = dpo_loss(m)
    assert torch.isfinite(loss).all()
    close(loss, [1000.0, 50.0, math.log(2), math.exp(-50), 0.0], 1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_refined_loss_matches_reference_cdpo_and_dpo(alpha):
    B = 9
    pc, pr, rc, rr = rand_logps(B, seed=4)
    m = dpo_margin(pc, pr, rc, rr, 0.1)
    mm = m.tolist()
    # z = 1 everywhere: TRL's sigmoid loss with label_smoothing = alpha (cDPO)
    cdpo = [-(1 - alpha) * log_sigmoid(x) - alpha * log_sigmoid(-x) for x in mm]
    close(refined_dpo_loss(m, torch.ones(B), alpha), cdpo, 1e-12)
    # z = 0 everywhere: plain DPO
    close(refined_dpo_loss(m, torch.zeros(B, dtype=torch.bool), alpha), [-log_sigmoid(x) for x in mm], 1e-12)
    # mixed z, per pair
    z = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    want = [-((1 - alpha * zi) * log_sigmoid(x) + alpha * zi * log_sigmoid(-x)) for x, zi in zip(mm, z.tolist())]
    close(refined_dpo_loss(m, z, alpha), want, 1e-12)


def test_dpo_and_refined_errors():
    pc, pr, rc, rr = rand_logps(4, seed=1)
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            dpo_margin(pc, pr, rc, rr, beta)
    with pytest.raises(ValueError, match=r"policy_chosen=\(4,\).*ref_rejected=\(3,\)"):
        dpo_margin(pc, pr, rc, rr[:3], 0.1)
    with pytest.raises(ValueError, match="floating"):
        dpo_margin(pc.long(), pr, rc, rr, 0.1)
    m = dpo_margin(pc, pr, rc, rr, 0.1)
    for alpha in (-0.01, 1.01):
        with pytest.raises(ValueError, match="alpha"):
            refined_dpo_loss(m, torch.zeros(4), alpha)
    with pytest.raises(ValueError, match=r"margin=\(4,\), z=\(3,\)"):
        refined_dpo_loss(m, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="z must be bool or hold only 0/1"):
        refined_dpo_loss(m, torch.full((4,), 0.5), 0.1)
    with pytest.raises(ValueError, match="margin must be a 1-D"):
        dpo_loss(m[None])


# ----------------------------------------------------------------------------- noise detection
@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.125, 0.5, 2.0])
def test_extrapolated_logprobs_matches_reference(B, T, V, lam):
    pl, ids, mask = make_batch(B, T, V, seed=T + V, dtype=torch.float64)
    rl = make_batch(B, T, V, seed=T + V + 1, dtype=torch.float64)[0]
    want = ref_extrapolated(pl, rl, ids, mask, lam)
    for chunk in sorted({1, 3, T - 1, T, 1000}):
        got = extrapolated_sequence_logprobs(pl, rl, ids, mask, lam, chunk_size=chunk)
        close(got, want, 1e-12)


def test_extrapolated_lam0_is_policy_logprobs_and_detached():
    pl, ids, mask = make_batch(4, 9, 10, seed=21)
    rl = torch.randn_like(pl).requires_grad_(True)
    pl.requires_grad_(True)
    got = extrapolated_sequence_logprobs(pl, rl, ids, mask, 0.0, chunk_size=4)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.allclose(got, sequence_logprobs(pl, ids, mask).detach(), atol=1e-5, rtol=1e-6)
    # bf16 logits: computed in float32, equal to the reference on the same bf16 values
    pb, rb = pl.detach().bfloat16(), rl.detach().bfloat16()
    got_b = extrapolated_sequence_logprobs(pb, rb, ids, mask, 0.25, chunk_size=2)
    assert got_b.dtype == torch.float32
    close(got_b, ref_extrapolated(pb, rb, ids, mask, 0.25), 1e-5)


def _dnd_ranking(drift: float, lam: float, seed: int = 5) -> list[int]:
    """Pairs ranked by the extrapolated confidence p_bar, for a policy whose logits are the
    reference's plus ``drift`` x noise (float64)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, beta = 64, 10, 13, 0.1
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.zeros(2 * B, T)
    mask[:, 4:] = 1
    ref = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64) * 2
    pol = ref + drift * torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    bar = extrapolated_sequence_logprobs(pol, ref, ids, mask, lam)
    ref_lp = sequence_logprobs(ref, ids, mask)
    p = decoupled_confidence(bar[:B], bar[B:], ref_lp[:B], ref_lp[B:], beta)
    return torch.argsort(p).tolist()


def test_extrapolation_keeps_the_confidence_ranking_near_the_reference_only():
    """docs/results-notes.md: to first order in the drift h_theta - h_ref, p_bar is a monotone
    function of the policy's own margin, so lambda changes which pairs are least confident
    only once the policy has moved far from its reference."""
    assert _dnd_ranking(1e-4, 0.5) == _dnd_ranking(1e-4, 0.0)
    assert _dnd_ranking(1.0, 0.5) != _dnd_ranking(1.0, 0.0)


def test_decoupled_confidence_matches_reference():
    bc, br, rc, rr = rand_logps(7, seed=9)
    for beta in (0.05, 0.1, 1.0):
        got = decoupled_confidence(bc, br, rc, rr, beta)
        close(got, [sigmoid(x) for x in ref_margin(bc, br, rc, rr, beta)], 1e-12)
    with pytest.raises(ValueError, match="beta"):
        decoupled_confidence(bc, br, rc, rr, 0.0)


def test_noise_detection_errors():
    pl, ids, mask = make_batch(2, 6, 5, seed=0)
    with pytest.raises(ValueError, match="lam"):
        extrapolated_sequence_logprobs(pl, pl, ids, mask, -0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        extrapolated_sequence_logprobs(pl, pl, ids, mask, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match=r"policy_logits=\(2, 6, 5\), ref_logits=\(2, 5, 5\)"):
        extrapolated_sequence_logprobs(pl, pl[:, :5], ids, mask, 0.5)
    with pytest.raises(ValueError, match="dtype"):
        extrapolated_sequence_logprobs(pl, pl.double(), ids, mask, 0.5)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        extrapolated_sequence_logprobs(pl, pl, ids, empty, 0.5)


def test_lambda_schedule():
    assert [lambda_for_iteration(t) for t in (1, 2, 3)] == [0.5, 0.25, 0.125]
    assert lambda_for_iteration(2, first=1.0) == 0.5
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="iteration"):
            lambda_for_iteration(bad)
    with pytest.raises(ValueError, match="first"):
        lambda_for_iteration(1, first=-0.5)


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_policy_only():
    B, T, V = 3, 8, 7
    pol_c, ids_c, mask_c = make_batch(B, T, V, seed=31)
    pol_r, ids_r, mask_r = make_batch(B, T, V, seed=32)
    ref_c = torch.randn(B, T, V, requires_grad=True)
    ref_r = torch.randn(B, T, V, requires_grad=True)
    pol_c.requires_grad_(True)
    pol_r.requires_grad_(True)
    pc, pr = sequence_logprobs(pol_c, ids_c, mask_c), sequence_logprobs(pol_r, ids_r, mask_r)
    rc, rr = sequence_logprobs(ref_c, ids_c, mask_c), sequence_logprobs(ref_r, ids_r, mask_r)  # caller forgot no_grad
    m = dpo_margin(pc, pr, rc, rr, 0.1)
    bc = extrapolated_sequence_logprobs(pol_c, ref_c, ids_c, mask_c, 0.5)
    br = extrapolated_sequence_logprobs(pol_r, ref_r, ids_r, mask_r, 0.5)
    conf = decoupled_confidence(bc, br, rc, rr, 0.1)
    z = ConfidenceWindow(size=4, warmup_fraction=0.0).flags(conf, step=0, total_steps=1)
    assert not conf.requires_grad and not z.requires_grad and not bc.requires_grad
    loss = refined_dpo_loss(m, z, 0.1).mean()
    loss.backward()
    assert pol_c.grad is not None and pol_c.grad.abs().sum() > 0
    assert pol_r.grad is not None and pol_r.grad.abs().sum() > 0
    assert ref_c.grad is None and ref_r.grad is None
    # gradient w.r.t. the margin matches d/dm of the float64 reference loss
    m2 = m.detach().clone().requires_grad_(True)
    refined_dpo_loss(m2, z, 0.1).sum().backward()
    want = [-((1 - 0.1 * zi) * (1 - sigmoid(x)) - 0.1 * zi * sigmoid(x)) for x, zi in zip(m.tolist(), z.tolist())]
    close(m2.grad, want, 1e-5)


# ----------------------------------------------------------------------------- memory
def test_extrapolation_never_allocates_a_full_vocab_sequence_tensor():
    """Every tensor created inside the call is at most [B, chunk, V] (no full [B, T, V] copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Biggest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max_numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and func is not torch.ops.aten.slice.Tensor and t._base is None:
                    self.max_numel = max(self.max_numel, t.numel())
            return out

    B, T, V, chunk = 2, 24, 50, 4
    pl, ids, mask = make_batch(B, T, V, seed=8, dtype=torch.bfloat16)
    rl = make_batch(B, T, V, seed=9, dtype=torch.bfloat16)[0]
    with Biggest() as mode:
        extrapolated_sequence_logprobs(pl, rl, ids, mask, 0.5, chunk_size=chunk)
    assert 0 < mode.max_numel <= B * chunk * V
