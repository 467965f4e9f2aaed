"""The swapped judges (judge.kind reward_model / llm_as_judge): math, training, loading, actor.

Real tiny models (tests/_tiny_model.py) on a toy preference that a model can learn:
for "list three colors", a response naming colors beats one naming animals.
"""

import math
import random

import pytest
import torch

from _tiny_model import save_tiny_model_dir, torch_single_thread  # noqa: F401
from spa_ray.data.records import PreferencePair
from spa_ray.judging.judge_models import (
    JudgeTrainSpec,
    judge_rows,
    load_model_judge,
    train_llm_judge,
    train_reward_model,
)
from spa_ray.judging.llm_judge import (
    ANSWER_A,
    ANSWER_B,
    judge_prompt,
    judge_sft_examples,
    option_logprobs,
    two_order_rewards,
)
from spa_ray.judging.reward_model import bradley_terry_loss, last_token_scores

GOOD = "red blue green yellow".split()
BAD = "cat dog fish bird".split()


def toy_pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good = " ".join(rng.sample(GOOD, 3)) + " ."
        bad = " ".join(rng.sample(BAD, 3)) + " ."
        out.append(PreferencePair("list three colors", good, bad, 1.0, 0.0))
    return out


# ------------------------------------------------------------------ pure math
def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_margin():
    rc = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    loss = bradley_terry_loss(rc, rr)
    expected = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip([2.0, -1.0, 0.5], [1.0, 1.0, 0.5])]
    assert torch.allclose(loss, torch.tensor(expected, dtype=torch.float64))
    loss.sum().backward()
    assert rc.grad is not None and bool((rc.grad < 0).all())  # raising r_chosen lowers the loss
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry_loss(rc, rr[:2])


def test_last_token_scores_picks_the_last_attended_position_for_either_padding():
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert last_token_scores(scores, right).tolist() == [2.0, 11.0]
    assert last_token_scores(scores.unsqueeze(-1), left).tolist() == [5.0, 11.0]
    with pytest.raises(ValueError, match=r"no attended token in rows \[1\]"):
        last_token_scores(scores, torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))


def test_two_order_rewards_cancel_a_pure_position_bias_and_mirror_under_swap():
    # A judge that always says (A) with the same log-probs, whatever the responses: no preference.
    la, lb = torch.full((3,), -0.1, dtype=torch.float64), torch.full((3,), -2.5, dtype=torch.float64)
    r1, r2 = two_order_rewards(la, lb, la, lb)
    assert torch.equal(r1, r2)
    # Swapping y1 and y2 swaps the rewards exactly: p(y1 > y2) + p(y2 > y1) = 1.
    a, b, a_s, b_s = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    r1, r2 = two_order_rewards(a, b, a_s, b_s)
    q1, q2 = two_order_rewards(a_s, b_s, a, b)
    assert torch.equal(r1, q2) and torch.equal(r2, q1)
    assert torch.allclose(r1, 0.5 * (a + b_s)) and torch.allclose(r2, 0.5 * (b + a_s))


def test_option_logprobs_are_log_softmax_entries_and_bad_ids_raise():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    la, lb = option_logprobs(logits, 2, 0)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert torch.equal(la, ref[:, 2]) and torch.equal(lb, ref[:, 0])
    with pytest.raises(ValueError, match="id_a=3 is outside"):
        option_logprobs(logits, 3, 0)
    with pytest.raises(ValueError, match="must differ"):
        option_logprobs(logits, 1, 1)


def test_judge_prompt_is_the_variants_template_and_sft_examples_cover_both_orders():
    q = judge_prompt("list three colors", "red blue green .", "cat dog fish .")
    assert q.startswith("Consider the following conversation between a human and an assistant: list three colors ")
    assert "Options: (A) red blue green . (B) cat dog fish . The answer is:" in q
    ex = judge_sft_examples(toy_pairs(2, 0))
    assert [a for _, a in ex] == [ANSWER_A, ANSWER_B, ANSWER_A, ANSWER_B]
    assert "(A) cat" not in ex[0][0] and "(A) cat" not in ex[2][0] and "(B) red" not in ex[0][0]


def test_config_selects_the_judge_and_rejects_bad_judge_model_settings():
    from spa_ray.pipeline.config import ConfigError, load_config

    config = load_config(None, ["judge.kind=llm_as_judge", "training.self_refine=false", "data.gold_pairs=all"])
    assert config.judge.kind == "llm_as_judge" and config.judge.model_epochs is None and config.data.gold_pairs == "all"
    for bad, key in (("judge.kind=pairrm", "judge.kind"), ("judge.model_pairs=0", "judge.model_pairs"),
                     ("judge.model_learning_rate=0", "judge.model_learning_rate"), ("data.gold_pairs=half", "data.gold_pairs")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


# ------------------------------------------------------------- trained judges
@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("judge_base") / "m", seed=3))


def _accuracy(judge, pairs):
    r1, r2 = judge.rewards([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    return float(((r1 > r2).double() + 0.5 * (r1 == r2).double()).mean())


def test_reward_model_learns_a_preference_and_loads_back_identically(base_model, tmp_path):
    out = tmp_path / "rm"
    spec = JudgeTrainSpec(epochs=2, learning_rate=3e-3, batch_size=16, seed=0)
    untrained_dir = tmp_path / "rm0"
    train_reward_model(base_model, toy_pairs(16, 9), untrained_dir, JudgeTrainSpec(epochs=1, learning_rate=1e-9))
    info = train_reward_model(base_model, toy_pairs(320, 1), out, spec)
    assert info["kind"] == "reward_model" and info["pairs"] == 320 and info["steps"] == 40
    assert (out / "model.safetensors").exists() and (out / "judge.json").exists()
    judge = load_model_judge(out)
    held_out = toy_pairs(100, 2)
    assert _accuracy(load_model_judge(untrained_dir), held_out) < 0.9  # the head starts random
    assert _accuracy(judge, held_out) >= 0.95
    # scores do not depend on what else is in the batch (pooling from the mask, not pad ids)
    prompts = ["list three colors"] * 3
    responses = ["red blue .", "cat dog fish bird cat dog .", "green ."]
    batched = judge.scores(prompts, responses)
    alone = torch.cat([judge.scores(prompts[i : i + 1], responses[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-5)
    # labels: Eq. 8 form on the scores, in the given order
    rows = [{"prompt": "list three colors", "response_1": p.rejected, "response_2": p.chosen} for p in held_out[:5]]
    labels = judge_rows(judge, rows)
    for lab in labels:
        assert lab["probability"] == pytest.approx(1 / (1 + math.exp(-(lab["reward_1"] - lab["reward_2"]))))
        assert lab["first_is_chosen"] == (lab["reward_1"] > lab["reward_2"])
    assert sum(not lab["first_is_chosen"] for lab in labels) >= 4


def test_llm_judge_adds_its_answer_tokens_learns_and_is_order_symmetric(base_model, tmp_path):
    out = tmp_path / "llm"
    info = train_llm_judge(base_model, toy_pairs(256, 3), out, JudgeTrainSpec(epochs=3, learning_rate=3e-3, batch_size=16))
    assert info["kind"] == "llm_as_judge" and info["examples"] == 512
    assert info["answers_added"] is True  # the tiny word-level vocabulary has no "(A)"/"(B)"
    judge = load_model_judge(out)
    assert len({judge.id_a, judge.id_b}) == 2
    assert judge.tok.convert_ids_to_tokens([judge.id_a, judge.id_b]) == [ANSWER_A, ANSWER_B]
    held_out = toy_pairs(100, 4)
    assert _accuracy(judge, held_out) >= 0.9
    prompts, first, second = [p.prompt for p in held_out], [p.chosen for p in held_out], [p.rejected for p in held_out]
    r1, r2 = judge.rewards(prompts, first, second)
    q1, q2 = judge.rewards(prompts, second, first)
    assert torch.allclose(r1, q2) and torch.allclose(r2, q1)  # both orders averaged: no position preference left


def test_model_judge_actor_labels_through_a_pool(ray_local, base_model, tmp_path):
    from spa_ray.actors.model_judge import ModelJudgeActor, label_rows_by_model
    from spa_ray.actors.pool import ShardedActors
    from spa_ray.pipeline.config import ActorGroup

    out = tmp_path / "rm"
    train_reward_model(base_model, toy_pairs(64, 5), out, JudgeTrainSpec(epochs=1, learning_rate=3e-3, batch_size=16))
    rows = [{"prompt": p.prompt, "response_1": p.chosen, "response_2": p.rejected} for p in toy_pairs(9, 6)]
    pool = ShardedActors(ModelJudgeActor, ActorGroup(count=2, num_cpus=0.5), {"model_path": str(out), "version": 0},
                         name="model_judges")
    try:
        got = label_rows_by_model(pool, rows)
        pool.require_version(0)
    finally:
        import ray

        for actor in pool.actors:
            ray.kill(actor)
    local = judge_rows(load_model_judge(out), rows)
    assert [g["reward_1"] for g in got] == pytest.approx([x["reward_1"] for x in local], abs=1e-6)
    assert [g["first_is_chosen"] for g in got] == [x["first_is_chosen"] for x in local]


# ------------------------------------------------------------- through the driver
@pytest.fixture(scope="module")
def embedded_tiny(tmp_path_factory):
    import os
    from pathlib import Path

    from spa_ray.tasks.embedded.build import TINY_BUILD, build_embedded_model

    cache = Path(os.environ.get("SPA_RAY_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    return str(build_embedded_model(cache_dir=cache, spec=TINY_BUILD, log=lambda m: None))


@pytest.mark.slow
def test_llm_as_judge_labels_an_iteration_of_the_real_driver(ray_local, embedded_tiny, tmp_path):
    """judge.kind=llm_as_judge swaps only the labeller: the judge is pi_init fine-tuned on D0
    as (A)/(B) questions, trained once in the run; its labels order the pairs."""
    import json

    import pyarrow.parquet as pq

    from spa_ray.pipeline.config import load_config
    from spa_ray.pipeline.driver import run_spa

    overrides = [
        f"run.root={tmp_path}", "run.name=llm", "run.iterations=1", f"model.name_or_path={embedded_tiny}",
        "model.max_prompt_len=48", "model.max_total_len=96", "data.task_kwargs={seed_fraction: 0.006, n_iterations: [32], n_evaluation: 8}",
        "data.judge_holdout_fraction=0.05", "judge.health_floor=0.0", "audit.floor=0.0", "judge.kind=llm_as_judge",
        "judge.model_epochs=1", "judge.model_learning_rate=3e-3", "training.self_refine=false", "judge.keep_fraction=1",
        "generation.max_new_tokens=24", "training.global_batch_size=8", "training.micro_batch_size=4",
        "training.seed_epochs=1", "training.learning_rate=1e-3", "evaluation.num_prompts=8",
        "evaluation.samples_per_prompt=1",
    ]
    assert run_spa(load_config(None, overrides)) == 0
    run = tmp_path / "llm"
    ledger = json.loads((run / "stages.json").read_text())["finished"]
    info = json.loads((run / "judge_model" / "judge.json").read_text())
    assert info["kind"] == "llm_as_judge" and info["pairs"] == ledger["prepare"]["seed_pairs"]
    assert info["examples"] == 2 * info["pairs"]
    pairs = pq.read_table(str(run / "data/iter_1/pairs/pairs.parquet")).to_pydict()
    judge = load_model_judge(run / "judge_model")
    r1, r2 = judge.rewards(pairs["prompt"], pairs["chosen"], pairs["rejected"])
    assert pairs["reward_chosen"] == pytest.approx(r1.tolist(), abs=1e-5)
    assert pairs["reward_rejected"] == pytest.approx(r2.tolist(), abs=1e-5)
    assert len(pairs["prompt"]) + ledger["judge_1"]["ties"] + ledger["judge_1"]["audit_pairs"] == 32
    assert "train_1" in ledger and "eval_pi_1" in ledger
