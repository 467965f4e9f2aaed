"""Reliability: a trainer worker dies mid-epoch and Ray Train restarts the group from its
last step checkpoint. Each of the four things a restart must restore is checked on its
own, against a run that never failed:

- optimizer state (AdamW moments) and data position: the final weights are identical;
- scheduler: every step's learning rate is identical, each step logged exactly once;
- RNG: the tiny model trains with dropout, so the weights depend on the torch RNG
  stream (checked: two forwards in train mode differ); identical weights need it restored;
- data position and confidence window: every pair's confidence and z flag from the
  steps before the checkpoint survive the restart and equal the clean run's.

Real parts: a local Ray cluster, Ray Train (FailureConfig) + DeepSpeed ZeRO-2 over gloo
with two workers, a tiny Llama folder, the injected failure is a real raised exception
in the last rank (TrainStageSpec.fail_at_step).
"""

import json

import pyarrow.parquet as pq
import pytest
import torch

from _tiny_model import save_tiny_model_dir
from spa_ray.models.loading import load_causal_lm, state_dict_checksum
from spa_ray.pipeline.config import ActorGroup
from spa_ray.training.pairs_table import write_pairs
from spa_ray.training.ray_trainer import run_train_stage
from test_training_ray import _pairs, _spec


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_worker_failure_restores_optimizer_scheduler_rng_and_data_position(ray_local, tmp_path):
    policy = save_tiny_model_dir(tmp_path / "pi_init", seed=0, attention_dropout=0.2)
    model = load_causal_lm(policy).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert not torch.equal(model(ids).logits, model(ids).logits), "dropout must consume the RNG"

    write_pairs(tmp_path / "pairs.parquet", _pairs(40))
    common = dict(checkpoint_every=3, epochs=1, global_batch_size=4, micro_batch_size=2, warmup_ratio=0.3,
                  confidence_window=6, denoise_warmup=0.2)
    workers = ActorGroup(count=2, num_cpus=1)
    clean = run_train_stage(_spec(tmp_path, policy, "clean", **common), workers, tmp_path / "s")
    failed = run_train_stage(_spec(tmp_path, policy, "failed", fail_at_step=7, **common), workers, tmp_path / "s")
    assert (failed / ".fault_failed").exists(), "the fault was injected"

    # optimizer, data position and RNG: the same weights, bit for bit
    assert state_dict_checksum(load_causal_lm(failed)) == state_dict_checksum(load_causal_lm(clean))
    # scheduler: the same learning rate (and loss) at every step, each step logged once
    log_clean, log_failed = _log(clean), _log(failed)
    assert [r["step"] for r in log_failed] == list(range(10))
    assert [(r["step"], r["lr"], r["loss"]) for r in log_failed] == [(r["step"], r["lr"], r["loss"]) for r in log_clean]
    assert len({r["lr"] for r in log_clean}) > 3  # warm-up then cosine: the lr really moves
    # data position and window: every pair's confidence and z flag, including steps before the checkpoint
    flags_clean = pq.read_table(clean / "noise_flags.parquet").to_pydict()
    flags_failed = pq.read_table(failed / "noise_flags.parquet").to_pydict()
    assert len(flags_clean["pair_index"]) == 40 and sum(flags_clean["z"]) > 0
    assert flags_failed == flags_clean
