"""The trainer group that stays up for the whole job: stages are calls on one live group.

Real parts: a local Ray cluster, one long Ray Train ``fit()`` in a driver thread with two
DeepSpeed ZeRO-2 workers over gloo, the stage mailbox actor, tiny Llama folders.
"""

import json

import pytest

from _tiny_model import save_tiny_model_dir
from spa_ray.models.loading import load_causal_lm, load_checkpoint_state_dict, state_dict_checksum
from spa_ray.pipeline.config import ActorGroup
from spa_ray.training.pairs_table import write_pairs
from spa_ray.training.trainer_group import StageFailedError, TrainerGroup
from test_training_ray import _pairs, _spec

WORKERS = ActorGroup(count=2, num_cpus=1)
SMALL = dict(epochs=1, global_batch_size=4, micro_batch_size=2)


def _disk_checksum(folder):
    return state_dict_checksum(load_checkpoint_state_dict(folder))


@pytest.mark.timeout(1800)
def test_two_stages_on_one_group_start_from_memory_and_equal_one_shot_stages(ray_local, tmp_path):
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    write_pairs(tmp_path / "pairs.parquet", _pairs(24))
    with TrainerGroup(WORKERS, tmp_path / "state") as group:
        group.warm(tmp_path / "no_such_model")  # a miss leaves the ranks cold, not failed
        assert group.warmed() is None
        group.warm(policy)  # the job's first stage: pi_init read ahead, while the driver evaluates
        ahead = group.warmed()
        assert ahead.checksum == _disk_checksum(policy)
        first = group.train_stage(_spec(tmp_path, policy, "first", policy_checksum=ahead.checksum,
                                        reference_checksum=ahead.checksum, **SMALL))
        # the published weights are the checkpoint's tensors, byte for byte
        assert first.weights.checksum == _disk_checksum(first.output_dir)
        assert first.details["from_memory"] is True and first.attempts == 1
        handle = first.weights
        second = group.train_stage(_spec(tmp_path, first.output_dir, "second", policy_checksum=handle.checksum,
                                         reference_checksum=handle.checksum, **SMALL))
    assert second.details["from_memory"] is True, "pi_1 came from the ranks' memory, not its folder"
    assert second.details["pid"] == first.details["pid"], "the same worker process ran both stages"
    assert second.weights.checksum == _disk_checksum(second.output_dir)
    assert second.step_seconds > 0 and second.fixed_seconds < second.seconds

    # the same two stages from their folders, on a group of their own: the same weights and steps
    with TrainerGroup(WORKERS, tmp_path / "state_cold") as group:
        first_cold = group.train_stage(_spec(tmp_path, policy, "first_cold", **SMALL))
        cold = group.train_stage(_spec(tmp_path, first.output_dir, "second_cold", **SMALL))
    assert first_cold.details["from_memory"] is False and cold.details["from_memory"] is False
    assert _disk_checksum(first_cold.output_dir) == first.weights.checksum
    assert _disk_checksum(cold.output_dir) == second.weights.checksum
    for warm, cold_ in ((first, first_cold), (second, cold)):
        log_warm = [json.loads(x) for x in (warm.output_dir / "train_log.jsonl").read_text().splitlines()]
        log_cold = [json.loads(x) for x in (cold_.output_dir / "train_log.jsonl").read_text().splitlines()]
        assert [(r["loss"], r["lr"]) for r in log_warm] == [(r["loss"], r["lr"]) for r in log_cold]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_worker_failure_in_stage_two_resumes_from_its_own_step_checkpoint(ray_local, tmp_path):
    """Stage 1 reports step checkpoints too; the restarted group must not resume stage 2
    from one of them, but from stage 2's own, and end on the weights of a clean stage 2."""
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0, attention_dropout=0.2)
    write_pairs(tmp_path / "pairs.parquet", _pairs(40))
    common = dict(checkpoint_every=3, epochs=1, global_batch_size=4, micro_batch_size=2)
    with TrainerGroup(WORKERS, tmp_path / "state") as group:
        first = group.train_stage(_spec(tmp_path, policy, "first", **common))
        kw = dict(policy_checksum=first.weights.checksum, reference_checksum=first.weights.checksum, **common)
        clean = group.train_stage(_spec(tmp_path, first.output_dir, "clean", **kw))
        failed = group.train_stage(_spec(tmp_path, first.output_dir, "failed", fail_at_step=7, **kw))
        assert (failed.output_dir / ".fault_failed").exists(), "the fault was injected"
        assert failed.attempts == 2 and failed.details["resumed_at_step"] == 6
        # the restart lost the ranks' memory: pi_1 came from its folder, with the same bytes
        assert failed.details["from_memory"] is False
        assert failed.weights.checksum == clean.weights.checksum == _disk_checksum(failed.output_dir)
        steps = [json.loads(x)["step"] for x in (failed.output_dir / "train_log.jsonl").read_text().splitlines()]
        assert steps == list(range(10))
        # the group is still up for the next stage
        after = group.train_stage(_spec(tmp_path, first.output_dir, "after", **common))
        assert after.details["pid"] == failed.details["pid"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_stage_past_its_failure_budget_raises_and_the_group_serves_the_next(ray_local, tmp_path):
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    write_pairs(tmp_path / "pairs.parquet", _pairs(16))
    # placement.trainer.threads: the workers use 2 torch threads on their 1 CPU each
    with TrainerGroup(ActorGroup(count=2, num_cpus=1, threads=2), tmp_path / "state", max_failures=0) as group:
        with pytest.raises(StageFailedError, match=r"(?s)stage broken: 1 failed attempts .*injected worker failure at step 1"):
            group.train_stage(_spec(tmp_path, policy, "broken", fail_at_step=1, **SMALL))
        ok = group.train_stage(_spec(tmp_path, policy, "ok", **SMALL))
    assert ok.attempts == 1 and ok.weights.checksum == _disk_checksum(ok.output_dir)
    assert ok.details["threads"] == 2
    assert load_causal_lm(ok.output_dir) is not None


@pytest.mark.timeout(1800)
def test_the_judge_on_the_trainers_ranks_labels_as_a_judge_actor_does(ray_local, tmp_path):
    """judge.on_trainer: the two ranks split the rows, label them with pi_{t-1} (from their
    memory, or from its folder) against pi_init, and rank 0 returns them in row order."""
    from test_actors_judge import _rows

    from spa_ray.actors import JudgeActor

    policy = save_tiny_model_dir(tmp_path / "pi_prev", seed=1)
    reference = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    rows = _rows(13)
    judge = dict(beta=0.1, length_penalty=0.01, max_tokens_per_batch=64)
    payload = dict(policy_path=str(policy), reference_path=str(reference), dtype="auto", version=3, **judge)
    with TrainerGroup(WORKERS, tmp_path / "state") as group:
        group.warm(policy)
        held = group.warmed()
        from_memory = group.label(rows, {**payload, "policy_checksum": held.checksum})
        from_folder = group.label(rows, {**payload, "policy_checksum": None})
        no_reference = group.label(rows[:4], {**payload, "policy_checksum": held.checksum, "reference_path": None})
    actor = JudgeActor(str(policy), str(reference), version=3, **judge)
    expected = actor.label(rows)
    for got in (from_memory, from_folder):
        assert len(got) == len(rows) and all(x["judge_version"] == 3 for x in got)
        for g, e in zip(got, expected):  # batches differ (rows split by rank): equal up to float noise
            assert g["reward_1"] == pytest.approx(e["reward_1"], abs=1e-5)
            assert g["reward_2"] == pytest.approx(e["reward_2"], abs=1e-5)
            near_tie = abs(e["reward_1"] - e["reward_2"]) < 1e-4  # exact ties depend on the batch's padding
            assert near_tie or (g["is_tie"], g["first_is_chosen"]) == (e["is_tie"], e["first_is_chosen"])
    assert from_memory[3]["reward_1"] == pytest.approx(from_memory[3]["reward_2"], abs=1e-5)  # identical responses
    assert all(x["logp_ref_1"] is None for x in no_reference)
    bare = JudgeActor(str(policy), None, version=3, **judge).label(rows[:4])
    assert [x["reward_1"] for x in no_reference] == pytest.approx([x["reward_1"] for x in bare], abs=1e-5)
