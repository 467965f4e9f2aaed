"""Reliability: numerical faults and training sets that cannot be trained on.

- A diverging learning rate makes the loss NaN/inf mid-stage: the stage stops with
  NonFiniteLossError naming the stage and step (not a Ray Train traceback, and not
  retried from a step checkpoint), and the last good checkpoint and the ledger are as
  they were.
- A labelled set that is all ties, or a seed set smaller than one global batch, is
  reported (NotEnoughPairsError naming the stage, the count and the batch size) and
  no trainer worker starts.

Real parts: a local Ray cluster, Ray Train + DeepSpeed over gloo, real judge actors,
tiny Llama folders saved with save_pretrained, the run directory.
"""

import hashlib
import random
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _tiny_model import WORDS, make_tiny_tokenizer, save_tiny_model_dir, torch_single_thread  # noqa: F401
from spa_ray.data.tokenize import encode_prompt
from spa_ray.pipeline.config import load_config
from spa_ray.pipeline.stages import NotEnoughPairsError, Run, judge_pairs, train_policy
from spa_ray.data.tables import write_parquet
from spa_ray.training.pairs_table import write_pairs
from spa_ray.training.worker import NonFiniteLossError

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model_dir(root / "pi_init", seed=0), save_tiny_model_dir(root / "pi_0", seed=1)


def _config(root, pi_init, *extra):
    return load_config(None, [
        f"run.root={root}", "run.name=num", f"model.name_or_path={pi_init}",
        "data.task=spa_ray.tasks.ultrafeedback:UltraFeedbackTask", f"data.task_kwargs={{dataset: '{FIXTURE}'}}",
        "training.global_batch_size=4", "training.micro_batch_size=2", "training.zero_stage=0", "audit.pairs=0", *extra,
    ])


def _pairs(n, seed=0):
    tok = make_tiny_tokenizer()
    rng = random.Random(seed)
    cols = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in range(n):
        cols["prompt_ids"].append(encode_prompt(tok, " ".join(rng.choices(WORDS[8:], k=4))))
        for side in ("chosen_ids", "rejected_ids"):
            cols[side].append(tok.convert_tokens_to_ids(rng.choices(WORDS[8:], k=rng.randint(1, 6))) + [tok.eos_token_id])
    return cols


def _good_pi_0(run: Run, source: Path) -> None:
    """pi_0 as a finished stage of the run: the last good checkpoint."""
    with run.dir.stage_dir("train_0", "checkpoints", "pi_0") as out:
        shutil.copytree(source, out, dirs_exist_ok=True)


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow  # 408 s on the loaded 2-core machine: Ray Train starts the group three times
def test_nonfinite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(ray_local, tmp_path, models):
    pi_init, pi_0 = models
    # lr 1e30 without warm-up: the weights blow up after the first updates and the loss turns NaN
    config = _config(tmp_path, pi_init, "training.learning_rate=1e30", "training.warmup_ratio=0",
                     "training.iteration_epochs=2")
    with Run.open(config) as run:
        _good_pi_0(run, pi_0)
        with run.dir.stage_dir("judge_1", "data", "iter_1", "pairs", pairs=16, ties=0) as out:
            write_pairs(out / "pairs.parquet", _pairs(16))
        pairs = run.dir.path / "data/iter_1/pairs/pairs.parquet"
        before_ckpt, before_ledger = _hashes(Path(run.checkpoint(0))), run.dir.finished_stages()
        started = time.monotonic()
        with pytest.raises(NonFiniteLossError, match=r"^stage train_1: non-finite (loss (nan|inf|-inf)|values) at step \d+ \(rank 0\)"):
            train_policy(run, t=1, policy=run.checkpoint(0), pairs=pairs)
        seconds = time.monotonic() - started
        print(f"spa-ray reliability: non-finite loss stopped train_1 in {seconds:.1f}s")
        assert not run.dir.is_done("train_1") and run.dir.finished_stages() == before_ledger
        assert not (run.dir.path / "checkpoints" / "pi_1").exists()
        assert not list(run.dir.path.rglob(".tmp-*"))
        assert _hashes(Path(run.checkpoint(0))) == before_ckpt  # the last good checkpoint, byte for byte


def test_seed_set_smaller_than_one_batch_is_reported_not_trained(ray_local, tmp_path, models):
    pi_init, _ = models
    with Run.open(_config(tmp_path, pi_init)) as run:
        pairs = tmp_path / "seed_pairs.parquet"
        write_pairs(pairs, _pairs(3))
        with pytest.raises(NotEnoughPairsError, match=r"train_0: the seed set D0 holds 3 gold pairs .*global_batch_size=4"):
            train_policy(run, t=0, policy=pi_init, pairs=pairs)
        assert not (run.dir.path / "checkpoints").exists() and not (run.dir.path / "ray_train").exists()
        assert run.dir.finished_stages() == []


def test_all_ties_labelled_set_is_reported_not_trained(ray_local, tmp_path, models):
    """Both samples of every prompt are the same response: the judge calls every pair a
    tie (r1 == r2 exactly), judge_1 records 0 pairs and the ties, train_1 refuses."""
    pi_init, pi_0 = models
    tok = make_tiny_tokenizer()
    rng = random.Random(1)
    with Run.open(_config(tmp_path, pi_init, "placement.trainer.num_cpus=0")) as run:
        _good_pi_0(run, pi_0)
        cols = {k: [] for k in ("prompt_index", "sample_index", "prompt", "prompt_ids", "response_ids", "text")}
        for i in range(12):
            prompt = " ".join(rng.choices(WORDS[8:], k=4))
            words = rng.choices(WORDS[8:], k=rng.randint(1, 6))
            for j in range(2):  # the same response twice: what greedy decoding gives
                cols["prompt_index"].append(i)
                cols["sample_index"].append(j)
                cols["prompt"].append(prompt)
                cols["prompt_ids"].append(encode_prompt(tok, prompt))
                cols["response_ids"].append(tok.convert_tokens_to_ids(words) + [tok.eos_token_id])
                cols["text"].append(" ".join(words))
        with run.dir.stage_dir("gen_1", "data", "iter_1", "generations", rows=24) as out:
            write_parquet(out / "generations.parquet", cols)
        pairs = judge_pairs(run, 1, run.dir.path / "data/iter_1/generations/generations.parquet")
        assert run.dir.stage_info("judge_1")["pairs"] == 0 and run.dir.stage_info("judge_1")["ties"] == 12
        assert pq.ParquetFile(pairs).metadata.num_rows == 0
        with pytest.raises(NotEnoughPairsError, match=r"train_1: iteration 1's labelled set holds 0 pairs \(12 ties"):
            train_policy(run, t=1, policy=run.checkpoint(0), pairs=pairs)
        assert not (run.dir.path / "checkpoints" / "pi_1").exists() and not (run.dir.path / "ray_train").exists()
