"""preference_step on a tiny random LlamaForCausalLM: the loss equals the layer-1 math on
separately computed log-probs, and a few optimizer steps increase the margin."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from spa_ray.objectives import (
    ConfidenceWindow,
    decoupled_confidence,
    dpo_loss,
    dpo_margin,
    extrapolated_sequence_logprobs,
    refined_dpo_loss,
    sequence_logprobs,
)
from spa_ray.training.preference_step import concat_preference_batch, preference_step

transformers = pytest.importorskip("transformers")
V = 64
BETA = 0.1


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()  # eval: no dropout, deterministic


def make_side(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = 2 + b  # prompts of varying length
        n = T - p - (b % 3)  # responses of varying length, right padding
        attn[b, : p + n] = 1
        resp[b, p : p + n] = True
        ids[b, p + n :] = 0
    return ids, attn, resp


@pytest.fixture(scope="module")
def models_and_batch():
    policy = tiny_llama(0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # make the reference differ, so margins are not all zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    B = 4
    c = make_side(B, 10, seed=1)
    r = make_side(B, 13, seed=2)
    batch = {
        "chosen_input_ids": c[0], "chosen_attention_mask": c[1], "chosen_response_mask": c[2],
        "rejected_input_ids": r[0], "rejected_attention_mask": r[1], "rejected_response_mask": r[2],
    }
    return policy, reference, batch


def separate_logps(model, batch, side):
    """An independent forward on one side only, unpadded to the other side's length."""
    ids, attn, resp = (batch[f"{side}_{f}"] for f in ("input_ids", "attention_mask", "response_mask"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    return logits, sequence_logprobs(logits, ids, resp)


def test_concat_pads_both_sides(models_and_batch):
    _, _, batch = models_and_batch
    cat = concat_preference_batch(batch, pad_token_id=0)
    assert cat["input_ids"].shape == (8, 13)
    assert torch.equal(cat["input_ids"][:4, :10], batch["chosen_input_ids"])
    assert not cat["response_mask"][:4, 10:].any() and not cat["attention_mask"][:4, 10:].any()
    assert torch.equal(cat["response_mask"][4:], batch["rejected_response_mask"])


def test_dpo_loss_equals_math_on_separate_logprobs(models_and_batch):
    policy, reference, batch = models_and_batch
    out = preference_step(policy, reference, batch, beta=BETA)
    _, pc = separate_logps(policy, batch, "chosen")
    _, pr = separate_logps(policy, batch, "rejected")
    _, rc = separate_logps(reference, batch, "chosen")
    _, rr = separate_logps(reference, batch, "rejected")
    m = dpo_margin(pc, pr, rc, rr, BETA)
    assert out.loss.item() == pytest.approx(dpo_loss(m).mean().item(), abs=1e-5)
    assert out.stats["margin"] == pytest.approx(m.mean().item(), abs=1e-5)
    assert out.stats["reward_accuracy"] == pytest.approx((m > 0).float().mean().item())
    assert out.stats["chosen_reward"] == pytest.approx((BETA * (pc - rc)).mean().item(), abs=1e-5)
    assert out.stats["rejected_reward"] == pytest.approx((BETA * (pr - rr)).mean().item(), abs=1e-5)
    assert out.z is None and out.stats["z_rate"] == 0.0 and math.isnan(out.stats["tau"])


def test_refined_loss_equals_math_and_reuses_logits(models_and_batch):
    policy, reference, batch = models_and_batch
    calls = {"n": 0}
    hook = policy.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        window = ConfidenceWindow(size=50, k_percent=50.0, warmup_fraction=0.0)
        out = preference_step(policy, reference, batch, beta=BETA, refine=True, alpha=0.3, lam=0.5,
                              window=window, step=3, total_steps=10, chunk_size=4)
    finally:
        hook.remove()
    assert calls["n"] == 1  # one policy forward for chosen + rejected, no extra one for noise detection
    (plc, pc), (plr, pr) = separate_logps(policy, batch, "chosen"), separate_logps(policy, batch, "rejected")
    (rlc, rc), (rlr, rr) = separate_logps(reference, batch, "chosen"), separate_logps(reference, batch, "rejected")
    bc = extrapolated_sequence_logprobs(plc, rlc, batch["chosen_input_ids"], batch["chosen_response_mask"], 0.5)
    br = extrapolated_sequence_logprobs(plr, rlr, batch["rejected_input_ids"], batch["rejected_response_mask"], 0.5)
    conf = decoupled_confidence(bc, br, rc, rr, BETA)
    assert torch.allclose(out.confidence, conf, atol=1e-6)
    tau = float(torch.quantile(conf.double(), 0.5))
    z = (conf.double() < tau).float()
    assert out.stats["tau"] == pytest.approx(tau, abs=1e-6)
    assert torch.equal(out.z, z) and out.stats["z_rate"] == pytest.approx(0.5)
    want = refined_dpo_loss(dpo_margin(pc, pr, rc, rr, BETA), z, 0.3).mean()
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)


def test_gradients_reach_policy_only(models_and_batch):
    policy, reference, batch = models_and_batch
    policy.zero_grad(set_to_none=True)
    window = ConfidenceWindow(size=50, k_percent=50.0, warmup_fraction=0.0)
    out = preference_step(policy, reference, batch, refine=True, window=window)
    out.loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in reference.parameters())
    assert not out.z.requires_grad and not out.confidence.requires_grad
    policy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("refine", [False, True])
def test_optimizer_steps_increase_margin(models_and_batch, refine):
    _, reference, batch = models_and_batch
    policy = copy.deepcopy(models_and_batch[0])
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    window = ConfidenceWindow(size=50, k_percent=10.0, warmup_fraction=0.2) if refine else None
    margins = []
    for step in range(6):
        out = preference_step(policy, reference, batch, beta=BETA, refine=refine, alpha=0.1, lam=0.25,
                              window=window, step=step, total_steps=6)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        margins.append(out.stats["margin"])
    final = preference_step(policy, reference, batch, beta=BETA).stats["margin"]
    assert final > margins[0] + 0.05, (margins, final)


def test_preference_step_errors(models_and_batch):
    policy, reference, batch = models_and_batch
    with pytest.raises(ValueError, match="window"):
        preference_step(policy, reference, batch, refine=True)
    bad = dict(batch)
    del bad["rejected_response_mask"]
    with pytest.raises(ValueError, match="rejected_response_mask"):
        preference_step(policy, reference, bad)
    bad = dict(batch, rejected_input_ids=batch["rejected_input_ids"][:3])
    with pytest.raises(ValueError, match="rejected tensors must share"):
        preference_step(policy, reference, bad)
    bad = {k: (v[:3] if k.startswith("rejected") else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="same number"):
        preference_step(policy, reference, bad)
    with pytest.raises(ValueError, match="beta"):
        preference_step(policy, reference, batch, beta=0.0)
