"""The benchmark scripts run at a toy size and print their table (no timing is asserted:
timing targets live in the benchmarks themselves, docs/performance.md)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spa_ray.tasks.embedded.build import TINY_BUILD, build_embedded_model

    cache = tmp_path_factory.mktemp("embedded-cache")
    return str(build_embedded_model(cache_dir=cache, spec=TINY_BUILD, log=lambda m: None))


def run_script(name: str, args: list[str], tmp_path: Path, timeout: int = 600) -> tuple[str, list[dict]]:
    out = tmp_path / f"{name}.csv"
    env = dict(os.environ, SPA_RAY_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--toy", "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "| side |" in res.stdout or "| micro_batch |" in res.stdout or "| pool |" in res.stdout, res.stdout
    assert "loadavg_start" in res.stdout and "threads" in res.stdout
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    return res.stdout, rows


def test_bench_train_step_toy(tiny_model, tmp_path):
    pytest.importorskip("trl")
    stdout, rows = run_script(
        "bench_train_step",
        ["--model", tiny_model, "--reps", "1", "--micro-batches", "2", "--global-batch", "4",
         "--no-memory", "--no-deepspeed"],
        tmp_path,
    )
    assert {r["side"] for r in rows} == {"spa_refined", "trl_dpo", "spa_refined_ungrouped", "spa_dpo"}
    assert all(float(r["achieved_over_peak"]) > 0 for r in rows)


def test_bench_judge_toy(tiny_model, tmp_path):
    stdout, rows = run_script(
        "bench_judge", ["--model", tiny_model, "--reps", "1", "--prompts", "4", "--max-new-tokens", "8"], tmp_path
    )
    assert [r["side"] for r in rows] == ["batched", "per_pair_loop", "batched_reuse"]
    # the batched judge and the plain loop label the pairs the same way (up to float ties)
    assert float(rows[0]["label_agreement_batched_vs_loop"]) >= 0.75
    assert rows[0]["reference"].endswith("pretrained")  # policy and reference differ


@pytest.mark.slow
def test_bench_generation_toy(tiny_model, tmp_path):
    stdout, rows = run_script(
        "bench_generation", ["--model", tiny_model, "--reps", "1", "--prompts", "4", "--max-new-tokens", "8"], tmp_path
    )
    assert [int(r["actors"]) for r in rows] == [1, 2]
    assert rows[0]["identical_samples_both_pools"] == "True"


@pytest.mark.slow
def test_bench_e2e_toy(tiny_model, tmp_path):
    stdout, rows = run_script(
        "bench_e2e", ["--model", tiny_model, "--reps", "1", "--prompts", "8", "--seq-threads", "1",
                      "--root", str(tmp_path / "runs")],
        tmp_path, timeout=1800,
    )
    assert [r["side"] for r in rows] == ["ray_default", "sequential_1t"]
    ray_row = rows[0]
    # iteration 2's training stage started from the trainer's memory, on the group iteration 1 started
    assert float(ray_row["train_from_memory"]) == 1.0
    assert 0 < float(ray_row["train_steps_s"]) < float(ray_row["train_s"])
    assert float(ray_row["iter1_s"]) > 0 and float(ray_row["iter2_s"]) > 0


def test_group_by_length_keeps_each_steps_pairs_and_sizes():
    """The worker's length grouping (docs/performance.md, change 1) only reorders within a step."""
    from spa_ray.training.batch_plan import BatchPlan, group_by_length

    plan = BatchPlan(num_pairs=50, global_batch_size=16, micro_batch_size=4, world_size=2, epochs=1, seed=3)
    lengths = [(7 * i) % 23 + 5 for i in range(50)]
    for step in range(plan.total_steps):
        for rank in range(2):
            before = plan.micro_batches(step, rank)
            after = group_by_length(before, lengths)
            assert sorted(i for mb in after for i in mb) == sorted(i for mb in before for i in mb)
            assert [len(mb) for mb in after] == [len(mb) for mb in before]
            flat = [lengths[i] for mb in after for i in mb]
            assert flat == sorted(flat, reverse=True)
            assert group_by_length(before, lengths) == after  # a pure function of the plan


def test_world_check_toy_measures_every_line(tiny_model, tmp_path):
    """#4's acceptance tool end to end on the tiny build: judge agreement, both DPO arms
    (on-policy pairs), the 100% arm's probes, room against the 3.3% arm's best lr."""
    import json

    out = tmp_path / "wc"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, str(BENCH / "world_check.py"), "--toy", "--cache-dir", str(Path(tiny_model).parents[1]),
         "--seeds", "0", "--judge-prompts", "16", "--eval-prompts", "16", "--seed-policy-lrs", "1e-4",
         "--seed-epochs", "1", "--full-fraction", "0.004", "--full-probes", "2", "--seed-source", "sft",
         "--pair-samples", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "| seed | judge_agreement |" in res.stdout
    assert "reuse took" in res.stderr + res.stdout  # the tiny build from the fixture, not a new one
    r = json.loads((out / "results.json").read_text())["results"][0]
    assert 0 < r["n_seed_pairs"] <= 1280 and 0 < r["n_full_pairs"] < 200
    cov = r["habit_coverage_seed"]  # 8 categories x 3 decoys in the default world
    assert cov["decoys"] == 24 and 0 <= cov["min"] <= cov["mean"] <= cov["max"] and 0 <= cov["uncovered"] <= 24
    assert 0 <= r["judge"]["agreement"] <= 1 and r["judge"]["pairs"] == 16
    arms = [r["dpo_seed"]["win_rate"], r["dpo_seed_at_lr"]["0.0001"]["win_rate"]]
    assert all(0 <= w <= 1 for w in arms) and 0 <= r["dpo_full"]["win_rate"] <= 1
    assert r["room"] == r["dpo_full"]["win_rate"] - max(arms)
    assert [c["step"] for c in r["dpo_full_curve"]][-1] == r["dpo_full_train"]["steps"]
    assert len(r["dpo_full_curve"]) == 2
    with open(out / "results.csv", newline="") as handle:
        assert [row["seed"] for row in csv.DictReader(handle)] == ["0"]


def test_habit_coverage_counts_contrasts_per_decoy():
    """world_check's coverage diagnostic: a pair counts for a decoy only when exactly one of
    its responses names it; the default world's demonstration seed covers every decoy."""
    import importlib.util

    from spa_ray.tasks.base import PreferencePair
    from spa_ray.tasks.embedded import EmbeddedTask

    spec = importlib.util.spec_from_file_location("world_check", BENCH / "world_check.py")
    wc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wc)
    task = EmbeddedTask()
    fruits = task.world.kb.members["fruits"]
    good = f"here are 2 fruits : 1 {fruits[0]} 2 {fruits[1]} ."
    bad = good.replace(fruits[1], task.world.kb.decoys["fruits"][0])
    prompt = f"list 2 fruits except {fruits[5]} and {fruits[6]}"
    pairs = [PreferencePair(prompt, good, bad, 6.0, 5.0), PreferencePair(prompt, bad, bad, 5.0, 5.0)]
    cov = wc.habit_coverage(task, pairs)
    assert (cov["decoys"], cov["max"], cov["uncovered"]) == (24, 1, 23)
    seed = task.seed_pairs(task.prompt_splits(0).seed, 0)
    cov = wc.habit_coverage(task, seed)
    assert cov["uncovered"] == 0 and cov["min"] >= 4, cov
