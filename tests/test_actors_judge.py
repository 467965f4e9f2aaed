"""Judge actors: labels and the gold health check equal the foundation's functions.

The reference numbers are computed in this process with models.scoring,
judging.implicit_reward and evaluation.win_rates on the same checkpoints.
"""

import random

import pytest
import ray
import torch

from _tiny_model import WORDS, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401
from spa_ray.actors import JudgeActor, ShardedActors, contiguous_shards, gold_accuracy, label_rows
from spa_ray.data.tokenize import encode_prompt
from spa_ray.evaluation.win_rates import implicit_reward_accuracy
from spa_ray.judging.implicit_reward import implicit_reward, label_pairs
from spa_ray.models.loading import load_causal_lm
from spa_ray.models.scoring import batched_policy_reference_logprobs
from spa_ray.pipeline.config import ActorGroup

BETA = 0.1
BUDGET = 64  # tokens per forward: several length buckets


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_ckpts")
    return [save_tiny_model_dir(root / f"v{v}", seed=v) for v in range(2)]


def _rows(n, seed=0):
    tok = make_tiny_tokenizer()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = encode_prompt(tok, " ".join(rng.choices(WORDS[8:], k=rng.randint(2, 6))))
        r1, r2 = (tok.convert_tokens_to_ids(rng.choices(WORDS[8:], k=rng.randint(1, 7))) + [tok.eos_token_id] for _ in range(2))
        if i == 3:
            r2 = list(r1)  # identical responses: a tie
        rows.append({"prompt_ids": prompt, "response_ids_1": r1, "response_ids_2": r2})
    return rows


def _num_shards(pool):
    """The pool's shard layout: the judge batches within a shard, so compare shard for shard."""
    return len(pool) * pool.shards_per_actor


def _direct(policy_path, reference_path, rows, first, second, length_penalty=0.0, shards=1):
    """The foundation's functions applied directly: what the judge must reproduce.

    Returns (logp_policy_1, logp_policy_2, logp_ref_1, logp_ref_2, reward_1, reward_2),
    computed per contiguous shard as the pool splits the rows, so that the length
    buckets (the float32 batch shapes) are the same and the numbers agree to the bit.
    """
    tok = make_tiny_tokenizer()
    policy = load_causal_lm(policy_path)
    reference = load_causal_lm(reference_path) if reference_path is not None else None
    parts = []
    for a, b in contiguous_shards(len(rows), shards):
        part, m = rows[a:b], b - a
        responses = [r[first] for r in part] + [r[second] for r in part]
        pol, ref = batched_policy_reference_logprobs(
            policy, reference, [r["prompt_ids"] for r in part] * 2, responses, tok.pad_token_id,
            max_tokens_per_batch=BUDGET,
        )
        lengths = torch.tensor([len(x) for x in responses])
        r = implicit_reward(pol, ref, BETA, response_lengths=lengths, length_penalty=length_penalty)
        none = torch.full((m,), float("nan"))
        parts.append((pol[:m], pol[m:], none if ref is None else ref[:m], none if ref is None else ref[m:], r[:m], r[m:]))
    return tuple(torch.cat(cols) for cols in zip(*parts))


@pytest.fixture(scope="module")
def judges(ray_local, ckpts):
    pool = ShardedActors(
        JudgeActor, ActorGroup(count=2, num_cpus=0.5),
        dict(policy_path=str(ckpts[1]), reference_path=str(ckpts[0]), version=1, beta=BETA,
             max_tokens_per_batch=BUDGET, dtype="float32", num_threads=1),
        name="judge",
    )
    yield pool
    pool.shutdown()


def test_judge_labels_equal_the_foundation_functions(judges, ckpts):
    rows = _rows(9)
    got = label_rows(judges, rows)
    p1, p2, q1, q2, r1, r2 = _direct(ckpts[1], ckpts[0], rows, "response_ids_1", "response_ids_2", shards=_num_shards(judges))
    labels = label_pairs(r1, r2)
    n = len(rows)
    assert len(got) == n
    for i, g in enumerate(got):
        assert g["logp_policy_1"] == pytest.approx(float(p1[i]), abs=1e-6)
        assert g["logp_policy_2"] == pytest.approx(float(p2[i]), abs=1e-6)
        assert g["logp_ref_1"] == pytest.approx(float(q1[i]), abs=1e-6)
        assert g["logp_ref_2"] == pytest.approx(float(q2[i]), abs=1e-6)
        assert g["reward_1"] == pytest.approx(float(r1[i]), abs=1e-6)
        assert g["reward_2"] == pytest.approx(float(r2[i]), abs=1e-6)
        assert g["probability"] == pytest.approx(float(labels.probability[i]), abs=1e-6)
        assert g["first_is_chosen"] == bool(labels.first_is_chosen[i])
        assert g["is_tie"] == bool(labels.is_tie[i])
        assert g["judge_version"] == 1
    assert got[3]["is_tie"] and got[3]["probability"] == 0.5 and not got[3]["first_is_chosen"]
    assert sum(g["first_is_chosen"] for g in got) not in (0, n - 1)  # both labels occur
    assert len({v["pid"] for v in judges.versions()}) == 2


def test_gold_accuracy_is_the_implicit_reward_accuracy(judges, ckpts):
    gold = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["response_ids_1"], "rejected_ids": r["response_ids_2"]} for r in _rows(11, seed=1)]
    *_, rc, rr = _direct(ckpts[1], ckpts[0], gold, "chosen_ids", "rejected_ids", shards=_num_shards(judges))
    want = implicit_reward_accuracy(rc, rr)
    assert 0.0 < want < 1.0
    assert gold_accuracy(judges, gold) == pytest.approx(want, abs=1e-12)
    *_, rc, rr = _direct(ckpts[1], ckpts[0], gold, "chosen_ids", "rejected_ids")  # one actor, one shard
    assert ray.get(judges.actors[0].gold_accuracy.remote(gold)) == pytest.approx(implicit_reward_accuracy(rc, rr), abs=1e-12)


def test_no_reference_length_penalty_and_set_reference(ckpts):
    """The actor class in this process (no Ray): reference 'none', Eq. 13, 'previous'."""
    rows = _rows(5, seed=2)
    judge = JudgeActor(str(ckpts[1]), None, version=1, beta=BETA, length_penalty=0.01, max_tokens_per_batch=BUDGET)
    got = judge.label(rows)
    *_, r1, r2 = _direct(ckpts[1], None, rows, "response_ids_1", "response_ids_2", length_penalty=0.01)
    assert all(g["logp_ref_1"] is None and g["logp_ref_2"] is None for g in got)
    assert [g["reward_1"] for g in got] == pytest.approx(r1.tolist(), abs=1e-9)
    assert [g["reward_2"] for g in got] == pytest.approx(r2.tolist(), abs=1e-9)
    for g, row in zip(got, rows):  # r = beta * log pi - a * |y|
        assert g["reward_1"] == pytest.approx(BETA * g["logp_policy_1"] - 0.01 * len(row["response_ids_1"]), abs=1e-6)

    judge.set_reference(str(ckpts[0]))  # reference = the previous model
    *_, r1, _ = _direct(ckpts[1], ckpts[0], rows, "response_ids_1", "response_ids_2", length_penalty=0.01)
    assert [g["reward_1"] for g in judge.label(rows)] == pytest.approx(r1.tolist(), abs=1e-9)
    assert judge.weights_info()["reference_path"] == str(ckpts[0])
    assert judge.label([]) == []


def test_judge_reuses_given_policy_logprobs(judges, ckpts):
    """judge.reuse_generator_logprobs: given log pi_{t-1} replace the policy forward."""
    rows = _rows(6, seed=3)
    full = label_rows(judges, rows)
    given = [dict(r, policy_logp_1=x["logp_policy_1"] + 1.0, policy_logp_2=x["logp_policy_2"]) for r, x in zip(rows, full)]
    reused = label_rows(judges, given)
    for a, b in zip(full, reused):
        assert b["logp_policy_1"] == pytest.approx(a["logp_policy_1"] + 1.0, abs=1e-5)
        assert b["logp_ref_1"] == pytest.approx(a["logp_ref_1"], abs=1e-5)
        assert b["reward_1"] - b["reward_2"] == pytest.approx(a["reward_1"] - a["reward_2"] + 0.1, abs=1e-4)
