"""SP2DPO: the beta_i mapping, the per-pair margin in the step, the annotators."""

import math

import pytest
import torch

from spa_ray.objectives.sp2dpo import CATEGORY_MULTIPLIERS, category_multiplier, per_pair_dpo_margin, sp2dpo_beta
from _references import policy_reference_logps


def test_beta_mapping_float64_reference():
    beta0 = 0.1
    cats, mags, confs = [], [], []
    for c in CATEGORY_MULTIPLIERS:
        for m in (1, 2, 3, 4, 5):
            for k in (0.0, 0.3, 1.0):
                cats.append(c), mags.append(m), confs.append(k)
    mult = torch.tensor([category_multiplier(c) for c in cats], dtype=torch.float64)
    got = sp2dpo_beta(beta0, mult, torch.tensor(mags, dtype=torch.float64), torch.tensor(confs, dtype=torch.float64))
    table = {"safety": 2, "factuality": 1.75, "instruction_following": 1.5, "reasoning": 1.25,
             "helpfulness": 1, "style": 0.5}
    for i, (c, m, k) in enumerate(zip(cats, mags, confs)):
        raw = beta0 * table[c] * (0.5 + m / 5) * (0.5 + 0.5 * k)
        ref = min(2 * beta0, max(0.5 * beta0, raw))
        assert float(got[i]) == pytest.approx(ref, rel=1e-12), (c, m, k)
    assert float(got.min()) == pytest.approx(0.05) and float(got.max()) == pytest.approx(0.2)


def test_beta_argument_errors():
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="magnitude"):
        sp2dpo_beta(0.1, one, one * 6, one)
    with pytest.raises(ValueError, match="confidence"):
        sp2dpo_beta(0.1, one, one, one * 2)
    with pytest.raises(ValueError, match="category"):
        category_multiplier("vibes")
    assert category_multiplier("Instruction-Following") == 1.5


def test_per_pair_margin_reduces_to_dpo_with_constant_beta():
    from spa_ray.objectives.dpo import dpo_margin

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    beta = torch.tensor([0.05, 0.1, 0.2, 0.1, 0.15], dtype=torch.float64)
    got = per_pair_dpo_margin(pc, pr, rc, rr, beta)
    ref = [b * ((a - c) - (d - e)) for b, a, c, d, e in zip(beta.tolist(), pc.tolist(), pr.tolist(), rc.tolist(),
                                                             rr.tolist())]
    assert got.tolist() == pytest.approx(ref, rel=1e-12)
    const = per_pair_dpo_margin(pc, pr, rc, rr, torch.full((5,), 0.1, dtype=torch.float64))
    assert const.tolist() == pytest.approx(dpo_margin(pc, pr, rc, rr, 0.1).tolist(), rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        per_pair_dpo_margin(pc, pr, rc, rr, torch.zeros(5, dtype=torch.float64))


def test_step_uses_pair_beta_in_loss_and_global_beta_for_noise_detection():
    from _tiny_model import make_tiny_llama, make_tiny_tokenizer
    from test_variants_wdro import _batch

    from spa_ray.objectives.confidence_window import ConfidenceWindow
    from spa_ray.training.preference_step import preference_step
    from spa_ray.variants.objective import SP2DPOObjective

    tok = make_tiny_tokenizer()
    policy, reference = make_tiny_llama(tok, seed=1), make_tiny_llama(tok, seed=2)
    batch = _batch(tok)
    beta_i = torch.tensor([0.05, 0.1, 0.2, 0.15])
    vbatch = dict(batch, pair_beta=beta_i)
    kw = dict(beta=0.1, refine=True, alpha=0.1, lam=0.5, step=5, total_steps=10)
    spa = preference_step(policy, reference, batch, window=ConfidenceWindow(size=8), **kw)
    out = preference_step(policy, reference, vbatch, window=ConfidenceWindow(size=8), objective=SP2DPOObjective(), **kw)
    # noise detection: global beta, identical confidences and flags
    assert torch.equal(out.confidence, spa.confidence) and torch.equal(out.z, spa.z)
    # loss: refined DPO with beta_i, float64 reference by hand
    lp, lr = policy_reference_logps(policy, reference, batch)
    total = 0.0
    for i in range(4):
        m = float(beta_i[i]) * ((lp[i] - lp[4 + i]) - (lr[i] - lr[4 + i])).item()
        z = float(out.z[i])
        ls = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        total += -((1 - 0.1 * z) * ls(m) + 0.1 * z * ls(-m))
    assert float(out.loss.detach()) == pytest.approx(total / 4, rel=1e-5)
    assert out.stats["beta_min"] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def task():
    from spa_ray.tasks.embedded import EmbeddedTask

    return EmbeddedTask()


def test_rule_annotator_reads_differing_qualities(task):
    from spa_ray.variants.annotators import QualityRuleAnnotator

    w = task.world
    p = next(x for x in task.all_prompts() if x.startswith("list 3"))
    good = " ".join(w.reference_answer(w.spec(p)))
    assert task.score(p, good) == 6.0
    no_end = good[:-2]                                  # ending lost: style, 1 of 6 points
    items = good.split(": ")[1].rstrip(" .").split()
    wrong = good.replace(items[1], "here")              # one invalid item: content (factuality)
    ann = QualityRuleAnnotator(task)
    a = ann.annotate_one(p, good, no_end)
    assert (a.category, a.magnitude, a.confidence) == ("style", 1.0, 1.0)
    b = ann.annotate_one(p, good, wrong)
    assert b.category == "factuality" and b.confidence == 1.0
    assert b.magnitude == math.ceil(5 * (task.score(p, good) - task.score(p, wrong)) / 6 - 1e-9)
    # a pair whose label contradicts its components gets confidence 0
    assert ann.annotate_one(p, no_end, good).confidence == 0.0
    # nothing differs: the softest beta
    same = ann.annotate_one(p, good, good)
    assert (same.category, same.magnitude, same.confidence) == ("style", 1.0, 0.0)


def test_rule_annotator_needs_quality_scores():
    from spa_ray.variants.annotators import QualityRuleAnnotator

    with pytest.raises(ValueError, match="annotator=teacher"):
        QualityRuleAnnotator(object())


def test_teacher_answer_parsing():
    from spa_ray.variants.annotators import parse_teacher_answer

    a = parse_teacher_answer('sure: {"category": "Factuality", "magnitude": 4, "confidence": 0.9} done')
    assert (a.category, a.magnitude, a.confidence, a.source) == ("factuality", 4.0, 0.9, "teacher")
    assert parse_teacher_answer("no json here") is None
    assert parse_teacher_answer('{"category": "vibes", "magnitude": 4, "confidence": 0.9}') is None
    assert parse_teacher_answer('{"category": "style", "magnitude": 9, "confidence": 0.9}') is None


def test_config_errors_name_the_key():
    from spa_ray.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="variant.sp2dpo.teacher_model"):
        load_config(None, ["variant.name=sp2dpo", "variant.sp2dpo.annotator=teacher"])
    with pytest.raises(ConfigError, match="variant.sp2dpo.annotator"):
        load_config(None, ["variant.sp2dpo.annotator=nonsense"])
