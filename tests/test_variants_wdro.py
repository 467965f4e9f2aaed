"""WDRO-DPO: the greedy worst case equals the Wasserstein LP; weights; wiring; end to end."""

import math

import numpy as np
import pytest
import torch

from spa_ray.objectives.wdro import (
    dr_dpo_loss,
    greedy_transport_fractions,
    wdro_budget,
    wdro_confidence,
    wdro_pair_weights,
    wdro_weights,
    worst_case_expected_loss,
)


def lp_worst_case(xi, xi_min, eps, grid_points=60):
    """sup over Q in the 1-Wasserstein ball of radius eps around (1/N) sum delta_{xi_i}, of
    E_Q[-log xi], on a grid of support points in [xi_min, 1]: a transport LP (Esfahani-Kuhn).

    Variables p[i, j] = share of pair i's mass sent to y_j. Returns (value, p)."""
    from scipy.optimize import linprog

    xi = np.asarray(xi, dtype=np.float64)
    n = len(xi)
    y = np.unique(np.concatenate([[xi_min], xi, np.linspace(xi_min, 1.0, grid_points)]))
    m = len(y)
    loss = -np.log(y)
    c = -np.tile(loss, n) / n                          # maximise (1/N) sum p_ij l(y_j)
    a_eq = np.zeros((n, n * m))
    for i in range(n):
        a_eq[i, i * m:(i + 1) * m] = 1.0               # each pair's mass is 1
    cost = np.abs(xi[:, None] - y[None, :]).reshape(-1) / n
    res = linprog(c, A_ub=cost[None, :], b_ub=[eps], A_eq=a_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun, res.x.reshape(n, m), y


@pytest.mark.parametrize("seed", range(8))
def test_greedy_equals_linear_program(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    xi_min = 0.05
    xi = np.clip(rng.uniform(0.02, 0.99, size=n), xi_min, 1.0)
    eps = float(rng.uniform(0.01, 0.3)) * float(np.mean(xi - xi_min))
    xi_t = torch.tensor(xi, dtype=torch.float64)
    f = greedy_transport_fractions(xi_t, xi_min, budget=n * eps)
    greedy_value = float(worst_case_expected_loss(xi_t, f, xi_min))
    lp_value, p, y = lp_worst_case(xi, xi_min, eps)
    assert greedy_value == pytest.approx(lp_value, rel=1e-9, abs=1e-9)
    # and the same plan: the LP moves exactly f_i of pair i to xi_min (unique for strictly convex l)
    j_min = int(np.argmin(np.abs(y - xi_min)))
    moving = xi > xi_min  # a pair clipped to xi_min is there already, with either reading
    np.testing.assert_allclose(p[moving, j_min], f.numpy()[moving], atol=1e-7)


def test_greedy_budget_beyond_everything_moves_all_mass():
    xi = torch.tensor([0.3, 0.9, 0.6], dtype=torch.float64)
    f = greedy_transport_fractions(xi, 0.05, budget=10.0)
    assert f.tolist() == [1.0, 1.0, 1.0]


def test_weights_float64_reference():
    margin = torch.tensor([-1.2, 0.3, 2.0, -4.0, 0.9], dtype=torch.float64)
    xi_min, frac, cap = 0.05, 0.1, 5.0
    # reference written out by hand
    xi = [min(1.0, max(xi_min, 1.0 / (1.0 + math.exp(-m)))) for m in margin.tolist()]
    budget = frac * sum(x - xi_min for x in xi)
    f = [0.0] * len(xi)
    for i in sorted(range(len(xi)), key=lambda k: xi[k]):
        gap = xi[i] - xi_min
        if budget <= 0 or gap <= 0:
            continue
        f[i] = min(1.0, budget / gap)
        budget -= f[i] * gap
    w_ref = [min(cap, (1 - fi) + fi * x / xi_min) for fi, x in zip(f, xi)]
    w, stats = wdro_pair_weights(margin, xi_min=xi_min, eps_fraction=frac, cap=cap)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-12)
    assert not w.requires_grad
    assert stats["wdro_weight_max"] == pytest.approx(max(w_ref))
    # the least confident pair above the floor carries the largest weight; one already
    # at xi_min (margin -4: sigma < 0.05) has nowhere to go and keeps weight 1
    assert int(torch.argmax(w)) == 0 and float(w[3]) == 1.0


def test_noisy_pairs_are_excluded_from_budget_and_weight():
    margin = torch.tensor([-3.0, -2.0, 1.0, 2.5], dtype=torch.float64)
    eligible = torch.tensor([False, True, True, True])
    w, _ = wdro_pair_weights(margin, eligible=eligible)
    assert w[0] == 1.0
    w_sub, _ = wdro_pair_weights(margin[1:])
    np.testing.assert_allclose(w[1:].numpy(), w_sub.numpy(), rtol=1e-12)


def test_budget_and_argument_errors():
    xi = wdro_confidence(torch.tensor([0.0, 10.0]), 0.05)
    assert xi.tolist()[0] == 0.5 and xi.tolist()[1] == pytest.approx(1.0, abs=1e-4)
    assert wdro_budget(xi, 0.05, 0.1, torch.tensor([True, True])) == pytest.approx(0.1 * (0.45 + float(xi[1]) - 0.05))
    with pytest.raises(ValueError, match="xi_min"):
        wdro_confidence(torch.tensor([0.0]), 0.0)
    with pytest.raises(ValueError, match="cap"):
        wdro_weights(torch.zeros(2), torch.ones(2), 0.05, cap=0.0)


def test_dr_dpo_anchor_float64():
    losses = torch.tensor([0.2, 1.5, 0.7], dtype=torch.float64)
    ref = -1.0 * math.log(sum(math.exp(-x) for x in losses.tolist()) / 3)
    assert float(dr_dpo_loss(losses, 1.0)) == pytest.approx(ref, rel=1e-12)


def test_preference_step_with_wdro_objective():
    """The step's loss is mean(w * per-pair DPO loss) with w from the global-beta margins."""
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer

    from spa_ray.objectives.dpo import dpo_loss
    from spa_ray.training.preference_step import preference_step
    from spa_ray.variants.objective import WDROObjective

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    policy, reference = make_tiny_llama(tok, seed=1), make_tiny_llama(tok, seed=2)
    batch = _batch(tok)
    base = preference_step(policy, reference, batch, beta=0.5)
    out = preference_step(policy, reference, batch, beta=0.5, objective=WDROObjective())
    m = torch.tensor([base.stats["margin"]])  # sanity: same margins
    assert out.stats["margin"] == pytest.approx(float(m))
    # recompute by hand from the margins
    from spa_ray.objectives.logprobs import sequence_logprobs
    from spa_ray.training.preference_step import concat_preference_batch

    cat = concat_preference_batch(batch)
    with torch.no_grad():
        lp = sequence_logprobs(policy(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"]).logits,
                               cat["input_ids"], cat["response_mask"])
        lr = sequence_logprobs(reference(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"]).logits,
                               cat["input_ids"], cat["response_mask"])
    B = batch["chosen_input_ids"].shape[0]
    margin = 0.5 * ((lp[:B] - lp[B:]) - (lr[:B] - lr[B:]))
    w, _ = wdro_pair_weights(margin.double())
    expected = float((w * dpo_loss(margin.double())).mean())
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert "wdro_weight_max" in out.stats


def _batch(tok, n=4):
    from spa_ray.data.collate import collate_preference_pairs
    from spa_ray.data.tokenize import tokenize_pair
    from spa_ray.data.tokenize import TokenizedPair

    words = ["red", "blue", "cat dog", "apple pear plum", "fish", "yes no yes"]
    pairs = []
    for i in range(n):
        c = tokenize_pair(tok, "list three colors", words[i % len(words)], max_prompt_len=32, max_total_len=64)
        r = tokenize_pair(tok, "list three colors", words[(i + 2) % len(words)], max_prompt_len=32, max_total_len=64)
        pairs.append(TokenizedPair(chosen=c, rejected=r))
    return collate_preference_pairs(pairs, tok.pad_token_id)


def test_base_objective_reproduces_the_spa_step():
    """The variant plumbing (one forward via _variant_forward, StepContext) with SPA's own
    objective gives SPA's numbers exactly; objective=None is the untouched SPA path."""
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer

    from spa_ray.objectives.confidence_window import ConfidenceWindow
    from spa_ray.training.preference_step import preference_step
    from spa_ray.variants.objective import VariantObjective

    tok = make_tiny_tokenizer()
    policy, reference = make_tiny_llama(tok, seed=1), make_tiny_llama(tok, seed=2)
    batch = _batch(tok)
    kw = dict(beta=0.1, refine=True, alpha=0.1, lam=0.5, step=5, total_steps=10)
    spa = preference_step(policy, reference, batch, window=ConfidenceWindow(size=8), **kw)
    via = preference_step(policy, reference, batch, window=ConfidenceWindow(size=8), objective=VariantObjective(), **kw)
    assert torch.equal(spa.loss.detach(), via.loss.detach())
    assert torch.equal(spa.z, via.z) and spa.stats == via.stats
