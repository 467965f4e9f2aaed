"""SSPO: the Bayes-risk threshold, the unpaired loss, the schedule, and the step wiring."""

import math

import numpy as np
import pytest
import torch

from spa_ray.objectives.sspo import (
    ThresholdEMA,
    bayes_risk,
    bayes_threshold,
    kde_cdf,
    paired_weight,
    scott_bandwidth,
    simpo_reward,
    sspo_loss,
    unpaired_loss,
)
from _references import policy_reference_logps


@pytest.mark.parametrize(
    "mu_w, sd_w, mu_l, sd_l", [(1.0, 1.0, -1.0, 1.0), (1.0, 0.8, -1.0, 1.2), (0.3, 0.5, -0.2, 0.4)]
)
def test_threshold_lands_at_the_minimum_risk_of_two_known_gaussians(mu_w, sd_w, mu_l, sd_l):
    from scipy.optimize import minimize_scalar
    from scipy.stats import norm

    def true_risk(d):
        return 0.5 * norm.cdf(d, mu_w, sd_w) + 0.5 * (1.0 - norm.cdf(d, mu_l, sd_l))

    best = minimize_scalar(true_risk, bounds=(mu_l, mu_w), method="bounded", options={"xatol": 1e-10}).x
    g = torch.Generator().manual_seed(0)
    w = mu_w + sd_w * torch.randn(6000, generator=g, dtype=torch.float64)
    lo = mu_l + sd_l * torch.randn(6000, generator=g, dtype=torch.float64)
    delta = bayes_threshold(w, lo, grid_size=1024)
    # the risk at our threshold is within a hair of the minimal risk, and delta near the argmin
    assert true_risk(delta) - true_risk(best) < 2e-4
    assert delta == pytest.approx(best, abs=0.06 * (sd_w + sd_l))


def test_kde_cdf_matches_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    g = torch.Generator().manual_seed(1)
    samples = torch.randn(50, generator=g, dtype=torch.float64) * 0.7 + 0.2
    kde = gaussian_kde(samples.numpy())  # Scott's rule by default
    assert scott_bandwidth(samples) == pytest.approx(float(np.sqrt(kde.covariance[0, 0])), rel=1e-10)
    points = torch.linspace(-2, 2, 9, dtype=torch.float64)
    ref = [kde.integrate_box_1d(-np.inf, float(x)) for x in points]
    np.testing.assert_allclose(kde_cdf(points, samples).numpy(), ref, rtol=1e-9, atol=1e-12)


def test_risk_is_half_far_away_and_threshold_defined_for_degenerate_batches():
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    lo = torch.tensor([0.0], dtype=torch.float64)
    assert float(bayes_risk(torch.tensor([-50.0], dtype=torch.float64), w, lo)) == pytest.approx(0.5)
    d = bayes_threshold(w, lo)
    assert 0.0 <= d <= 1.0  # identical rewards / one sample: near-point masses, still separates


def test_unpaired_loss_float64_reference():
    r = torch.tensor([-1.0, -0.2, 0.0, 0.4, 3.0], dtype=torch.float64)
    delta, beta = 0.1, 2.0

    def nls(x):  # -log sigma(x)
        return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))

    ref = []
    for x in r.tolist():
        d = beta * (x - delta)
        ref.append(0.5 * nls(d) if d > 0 else 0.5 * nls(-d))
    np.testing.assert_allclose(unpaired_loss(r, delta, beta).numpy(), ref, rtol=1e-12)


def test_schedule_and_mix():
    assert paired_weight(0, 10, 90) == 1.0
    assert paired_weight(1000, 10, 90) == pytest.approx(math.exp(-1.0))
    assert paired_weight(10**6, 10, 90) == pytest.approx(0.1)  # g_min
    assert paired_weight(500, 10, 0) == 1.0                    # no unpaired data: paired only
    pl = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ul = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64)
    assert float(sspo_loss(pl, ul, 0.25)) == pytest.approx(0.25 * 2.0 + 0.75 * 0.7)
    assert float(sspo_loss(pl, ul[:0], 0.25)) == pytest.approx(0.5)


def test_simpo_reward_and_ema():
    r = simpo_reward(torch.tensor([-6.0, -2.0]), torch.tensor([3, 4]), 2.0)
    assert r.tolist() == pytest.approx([-4.0, -1.0])
    ema = ThresholdEMA(momentum=0.9, grid_size=64)
    w1, l1 = torch.tensor([1.0, 1.2, 0.9]), torch.tensor([-1.0, -0.8, -1.1])
    d1 = ema.update(w1, l1)
    assert d1 == pytest.approx(bayes_threshold(w1, l1, 64))
    d2 = ema.update(w1 + 1, l1 + 1)
    assert d2 == pytest.approx(0.9 * d1 + 0.1 * bayes_threshold(w1 + 1, l1 + 1, 64))
    fresh = ThresholdEMA()
    fresh.load_state_dict(ema.state_dict())
    assert fresh.value == ema.value


def test_step_mixes_paired_and_unpaired_losses():
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer
    from test_variants_wdro import _batch

    from spa_ray.data.tokenize import tokenize_pair
    from spa_ray.objectives.dpo import dpo_loss
    from spa_ray.objectives.logprobs import response_lengths, sequence_logprobs
    from spa_ray.training.preference_step import concat_preference_batch, preference_step
    from spa_ray.variants.objective import SSPOObjective

    tok = make_tiny_tokenizer()
    policy, reference = make_tiny_llama(tok, seed=1), make_tiny_llama(tok, seed=2)
    batch = _batch(tok)
    # three unpaired responses, one longer than every pair (the forward pads the pairs)
    seqs = [tokenize_pair(tok, "give me two fruits", r, max_prompt_len=32, max_total_len=64)
            for r in ("apple pear", "fig", "cat dog fish bird apple pear plum fig red blue green yellow")]
    T = max(len(s.input_ids) for s in seqs)
    u_ids = torch.full((3, T), tok.pad_token_id)
    u_attn = torch.zeros((3, T), dtype=torch.long)
    u_resp = torch.zeros((3, T), dtype=torch.bool)
    for k, s in enumerate(seqs):
        u_ids[k, : len(s.input_ids)] = torch.tensor(s.input_ids)
        u_attn[k, : len(s.input_ids)] = 1
        u_resp[k, s.prompt_len: len(s.input_ids)] = True
    vbatch = dict(batch, unpaired_input_ids=u_ids, unpaired_attention_mask=u_attn, unpaired_response_mask=u_resp)
    objective = SSPOObjective(beta=2.0, n_paired=1, n_unpaired=9, grid_size=256)
    out = preference_step(policy, reference, vbatch, beta=0.1, step=2000, total_steps=3000, objective=objective)

    # by hand, from separate forwards
    lp, lr = policy_reference_logps(policy, reference, batch)
    with torch.no_grad():
        lu = sequence_logprobs(policy(input_ids=u_ids, attention_mask=u_attn).logits, u_ids, u_resp).double()
    B = 4
    lens = response_lengths(concat_preference_batch(batch)["response_mask"]).double()
    r_w, r_l = 2.0 * lp[:B] / lens[:B], 2.0 * lp[B:] / lens[B:]
    delta = bayes_threshold(r_w, r_l, 256)
    r_u = 2.0 * lu / response_lengths(u_resp).double()
    g = max(0.1, math.exp(-0.001 * 2000))
    pair = dpo_loss(0.1 * ((lp[:B] - lp[B:]) - (lr[:B] - lr[B:]))).mean()
    expected = g * float(pair) + (1 - g) * float(unpaired_loss(r_u, delta, 2.0).mean())
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert out.stats["sspo_g"] == pytest.approx(g)
    assert out.stats["sspo_delta"] == pytest.approx(delta, abs=1e-4)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_trainer_side_unpaired_rows_are_a_function_of_step(tmp_path):
    from spa_ray.variants.training import TrainVariant
    from spa_ray.variants.unpaired import write_unpaired

    write_unpaired(tmp_path / "u.parquet", {"prompt_ids": [[1, 2], [1, 3, 4], [5]] * 3,
                                            "response_ids": [[7], [8, 9], [6, 6, 6]] * 3})
    table = {"prompt_ids": [[1]] * 4, "chosen_ids": [[2]] * 4, "rejected_ids": [[3]] * 4}
    spec = {"name": "sspo", "beta": 2.0, "ema_momentum": 0.9, "decay": 0.001, "grid_size": 64,
            "unpaired_per_micro_batch": 4, "unpaired_path": str(tmp_path / "u.parquet")}
    a = TrainVariant(spec, table, seed=3, rank=0, micro_batch_size=2)
    b = TrainVariant(spec, table, seed=3, rank=0, micro_batch_size=2)
    x, y = a.batch_extras([0, 1], step=5, j=1, pad_token_id=0), b.batch_extras([0, 1], step=5, j=1, pad_token_id=0)
    assert set(x) == {"unpaired_input_ids", "unpaired_attention_mask", "unpaired_response_mask"}
    assert all(torch.equal(x[k], y[k]) for k in x)                       # resumable: same rows
    assert x["unpaired_input_ids"].shape[0] == 4
    assert (x["unpaired_response_mask"].sum(1) >= 1).all()
    assert (x["unpaired_attention_mask"].sum(1) >= x["unpaired_response_mask"].sum(1) + 1).all()
    assert a.objective.n_unpaired == 9 and a.objective.n_paired == 4
