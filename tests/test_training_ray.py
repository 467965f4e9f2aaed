"""The Ray Train worker group: DeepSpeed ZeRO over gloo, the shared window, the saved folder.

Real parts: a local Ray cluster, a tiny Llama saved with save_pretrained, DeepSpeed.
DeepSpeed's first init compiles a small op (~60 s, cached in TORCH_EXTENSIONS_DIR).
"""

import json
import os
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from _tiny_model import WORDS, make_tiny_tokenizer, save_tiny_model_dir
from spa_ray.data.tokenize import encode_prompt
from spa_ray.models.loading import load_causal_lm, state_dict_checksum
from spa_ray.pipeline.config import ActorGroup
from spa_ray.training.batch_plan import BatchPlan
from spa_ray.training.pairs_table import write_pairs
from spa_ray.training.ray_trainer import run_train_stage
from spa_ray.training.worker import TrainStageSpec


def _pairs(n, seed=0):
    tok = make_tiny_tokenizer()
    rng = random.Random(seed)
    cols = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in range(n):
        prompt = encode_prompt(tok, " ".join(rng.choices(WORDS[8:], k=4)))
        cols["prompt_ids"].append(prompt)
        for side in ("chosen_ids", "rejected_ids"):
            words = rng.choices(WORDS[8:], k=rng.randint(1, 6))
            cols[side].append(tok.convert_tokens_to_ids(words) + [tok.eos_token_id])
    return cols


def _spec(tmp_path, policy, stage, **kw):
    base = dict(
        stage=stage, policy_path=str(policy), reference_path=str(policy), pairs_path=str(tmp_path / "pairs.parquet"),
        output_dir=str(tmp_path / stage), epochs=2, refine=True, lam=0.5, seed=3, learning_rate=1e-2,
        global_batch_size=8, micro_batch_size=2, zero_stage=2, confidence_window=8, k_percent=25.0,
    )
    base.update(kw)
    return TrainStageSpec(**base)


def test_batch_plan_covers_each_epoch_once_across_ranks():
    plan = BatchPlan(num_pairs=37, global_batch_size=8, micro_batch_size=2, world_size=2, epochs=2, seed=1)
    assert plan.accumulation_steps == 2 and plan.steps_per_epoch == 4 and plan.total_steps == 8
    for epoch in range(2):
        seen = [i for step in range(epoch * 4, epoch * 4 + 4) for r in range(2) for mb in plan.micro_batches(step, r) for i in mb]
        assert len(seen) == len(set(seen)) == 32
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(num_pairs=7, global_batch_size=8, micro_batch_size=2, world_size=2, epochs=1, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        BatchPlan(num_pairs=70, global_batch_size=8, micro_batch_size=3, world_size=2, epochs=1, seed=0)


@pytest.mark.timeout(1800)  # a hang on a build lock fails instead of blocking CI
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_gloo_workers_train_and_save_a_loadable_model(ray_local, tmp_path, zero_stage):
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    write_pairs(tmp_path / "pairs.parquet", _pairs(40))
    buckets = {"zero_optimization": {"reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000}}
    spec = _spec(tmp_path, policy, f"train_z{zero_stage}", zero_stage=zero_stage, deepspeed=buckets)
    # a build killed midway left its lock: without clear_stale_extension_locks DeepSpeed's
    # shm op load would wait on it forever (pytest-timeout would fail the test)
    stale = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    out = run_train_stage(spec, ActorGroup(count=2, num_cpus=1), tmp_path / "train_state")
    assert not stale.exists()
    ran = json.loads((out / "deepspeed_config.json").read_text())  # training.deepspeed reached the engine's config
    assert ran["zero_optimization"] == {"stage": zero_stage, **buckets["zero_optimization"]}
    assert ran["gradient_accumulation_steps"] == 2  # 8 pairs = 2 ranks x micro 2 x 2

    trained = load_causal_lm(out)
    before = load_causal_lm(policy)
    assert state_dict_checksum(trained) != state_dict_checksum(before)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10))  # 40 pairs // 8 = 5 steps x 2 epochs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # the chosen responses become likelier than the rejected ones on the training pairs
    assert log[-1]["margin"] > log[0]["margin"]
    # the window is shared: z flags exist for every pair seen, warm-up steps give z = 0
    flags = pq.read_table(out / "noise_flags.parquet").to_pydict()
    assert len(flags["pair_index"]) == 80 and set(flags["z"]) <= {0.0, 1.0}
    assert 0 < sum(flags["z"]) < 80


@pytest.mark.slow
def test_worker_failure_resumes_from_step_checkpoint_to_the_same_weights(ray_local, tmp_path):
    """A worker dies mid-epoch; Ray Train restarts the group from the last step checkpoint
    (optimizer, scheduler, window, RNG and data position restored) and ends on the same
    weights as a run that never failed."""
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    write_pairs(tmp_path / "pairs.parquet", _pairs(40))
    common = dict(checkpoint_every=3, epochs=1, global_batch_size=4, micro_batch_size=2)
    clean = run_train_stage(_spec(tmp_path, policy, "clean", **common), ActorGroup(count=2, num_cpus=1), tmp_path / "s")
    failed = run_train_stage(
        _spec(tmp_path, policy, "failed", fail_at_step=7, **common), ActorGroup(count=2, num_cpus=1), tmp_path / "s"
    )
    assert (failed / ".fault_failed").exists(), "the fault was injected"
    assert state_dict_checksum(load_causal_lm(failed)) == state_dict_checksum(load_causal_lm(clean))
