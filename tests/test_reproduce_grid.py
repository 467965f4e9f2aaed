"""benchmarks/reproduce.py: the reduced grid (benchmarks/grids/smoke.yaml) through the real
driver on a real local Ray cluster, and the label-quality and claim arithmetic it reports.

The smoke grid is two cells (SPA; iterative DPO with the reward-model judge), one data
seed, toy sizes, on the embedded task's seconds-scale TINY_BUILD model.
"""

import csv
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reproduce = _load_reproduce()


# ------------------------------------------------------------------ the arithmetic
def test_label_quality_counts_agreement_before_and_after_refinement(tmp_path):
    # 6 pairs: gold winner chosen in 0, 1, 2, 3; wrong in 4, 5; pair 6 gold tie (ignored); pair 7 no z (last partial batch)
    table = {
        "prompt_ids": [[1]] * 8, "chosen_ids": [[2]] * 8, "rejected_ids": [[3]] * 8,
        "gold_chosen": [5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 4.0],
        "gold_rejected": [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 3.0, 1.0],
        "z": [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, None],
    }
    path = tmp_path / "labelled_pairs.parquet"
    pq.write_table(pa.table(table), str(path))
    q = reproduce.label_quality(path, alpha=0.1)
    assert q["decided_pairs"] == 7
    assert q["agreement"] == pytest.approx(5 / 7)  # before refinement: every decided pair, z or not
    # with z known (6 pairs): flagged = {3 (right), 4 (wrong)}
    assert q["flag_rate"] == pytest.approx(2 / 6)
    assert q["flag_precision"] == pytest.approx(1 / 2)
    assert q["flag_recall"] == pytest.approx(1 / 2)  # wrong: {4, 5}; 4 flagged
    assert q["agreement_after"] == pytest.approx((1 + 1 + 1 + 0.9 + 0.1 + 0) / 6)
    assert q["flag_lift"] == pytest.approx(0.5 - (1 - 5 / 7))


def _rows(values_a, values_b, metric="win_rate"):
    rows = []
    for seed, (a, b) in enumerate(zip(values_a, values_b)):
        rows.append({"cell": "a", "seed": seed, "iteration": 2, metric: a})
        rows.append({"cell": "b", "seed": seed, "iteration": 2, metric: b})
        rows.append({"cell": "b", "seed": seed, "iteration": 0, metric: 0.5})
    return rows


def test_claims_are_paired_by_seed_and_need_two_standard_errors():
    holds = reproduce.check_claim(_rows([0.60, 0.62, 0.61], [0.50, 0.51, 0.52]), {"a": "a", "op": ">", "b": "b"})
    assert holds["verdict"] == "holds" and holds["diff"] == pytest.approx(0.1) and holds["seeds"] == 3
    noisy = reproduce.check_claim(_rows([0.60, 0.40, 0.56], [0.50, 0.50, 0.50]), {"a": "a", "op": ">", "b": "b"})
    assert noisy["verdict"] == "direction holds, within noise"
    opposite = reproduce.check_claim(_rows([0.40, 0.41, 0.42], [0.50, 0.51, 0.52]), {"a": "a", "op": ">", "b": "b"})
    assert opposite["verdict"] == "does not hold (opposite)"
    shorter = reproduce.check_claim(_rows([10, 11, 12], [14, 15, 16], "mean_length"),
                                    {"a": "a", "op": "<", "b": "b", "metric": "mean_length"})
    assert shorter["verdict"] == "holds"
    at_pi0 = reproduce.check_claim(_rows([0.6, 0.6], [0.5, 0.5]), {"a": "a", "op": ">", "b": "b@pi0"})
    assert at_pi0["b_mean"] == 0.5
    constant = reproduce.check_claim(_rows([0.2, 0.3, 0.25], [0, 0, 0]), {"a": "a", "op": ">", "b": 0})
    assert constant["verdict"] == "holds"
    one_seed = reproduce.check_claim(_rows([0.6], [0.5]), {"a": "a", "op": ">", "b": "b"})
    assert one_seed["verdict"].startswith("direction holds (1 seed")
    missing = reproduce.check_claim(_rows([0.6], [0.5]), {"a": "a", "op": ">", "b": "nope"})
    assert missing["verdict"] == "not run"


# ------------------------------------------------------------------ the smoke grid
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spa_ray.tasks.embedded.build import TINY_BUILD, build_embedded_model

    cache = Path(os.environ.get("SPA_RAY_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    return str(build_embedded_model(cache_dir=cache, spec=TINY_BUILD, log=lambda m: None))


def test_the_page_names_the_command_that_makes_the_whole_grid_not_a_filtered_call():
    grid = "benchmarks/grids/reproduce.yaml"
    filtered = reproduce.parser().parse_args(
        ["--grid", grid, "--jobs", "2", "--docs", "docs/results.md", "--seeds", "2", "--cells", "spa", "--report-only"])
    whole = reproduce.parser().parse_args(["--grid", grid, "--jobs", "2", "--docs", "docs/results.md"])
    assert reproduce.page_command(filtered) == reproduce.page_command(whole)
    assert reproduce.page_command(whole).endswith(
        "benchmarks/reproduce.py --grid benchmarks/grids/reproduce.yaml --jobs 2 --docs docs/results.md")
    kept = reproduce.parser().parse_args(["--grid", grid, "--set", "run.iterations=1", "--no-share", "--cells", "spa"])
    assert reproduce.page_command(kept).endswith("--set run.iterations=1 --no-share")


def test_variant_diagnostics_average_each_stage_over_steps_then_seeds(tmp_path):
    """The 'What the variants did' table: variant.json numbers per stage, train_log step
    numbers averaged over the stage, then mean ± sd over seeds; SPA's own runs are left out."""
    def write_run(name, stages):
        for t, (prep, steps) in stages.items():
            folder = tmp_path / name / "checkpoints" / f"pi_{t}"
            folder.mkdir(parents=True)
            (folder / "variant.json").write_text(json.dumps({"variant": "sp2dpo", "stage": t, **prep}))
            (folder / "train_log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 0.5, **s}) + "\n"
                                                            for i, s in enumerate(steps)))
        return str(tmp_path / name)

    s0 = write_run("var-s0", {0: ({"beta_mean": 0.1, "categories": {"a": 3}}, [{"beta_mean": 0.1}, {"beta_mean": 0.3}]),
                              1: ({"beta_mean": 0.2}, [{"beta_mean": 0.2}])})
    s1 = write_run("var-s1", {0: ({"beta_mean": 0.3}, [{"beta_mean": 0.4}, {"beta_mean": float("nan")}])})
    spa = write_run("spa-s0", {0: ({"beta_mean": 9.0}, [{"beta_mean": 9.0}])})
    finished = [{"cell": "var", "seed": 0, "run_dir": s0, "variant": "sp2dpo"},
                {"cell": "var", "seed": 0, "run_dir": s0, "variant": "sp2dpo"},  # one row per evaluated policy
                {"cell": "var", "seed": 1, "run_dir": s1, "variant": "sp2dpo"},
                {"cell": "spa", "seed": 0, "run_dir": spa, "variant": "spa"}]
    rows = reproduce.variant_diagnostics(finished)
    assert [(r["cell"], r["seed"], r["stage"]) for r in rows] == [("var", 0, 0), ("var", 0, 1), ("var", 1, 0)]
    assert rows[0]["beta_mean"] == pytest.approx(0.2) and rows[0]["prep_beta_mean"] == 0.1 and rows[0]["steps"] == 2
    assert rows[2]["beta_mean"] == pytest.approx(0.4)  # a non-finite step value is skipped
    table = reproduce.variant_table(rows).splitlines()
    assert table[2] == "| var | pi_0 | 2 | 2 | prep_beta_mean 0.200 ± 0.141; beta_mean 0.300 ± 0.141 |"
    assert table[3] == "| var | pi_1 | 1 | 1 | prep_beta_mean 0.200; beta_mean 0.200 |"


def test_smoke_grid_runs_both_cells_through_the_driver_and_writes_the_report(ray_local, tiny_model, tmp_path):
    root, docs = tmp_path / "grids", tmp_path / "docs" / "results.md"
    argv = ["--grid", str(REPO / "benchmarks/grids/smoke.yaml"), "--root", str(root), "--in-process",
            "--set", f"model.name_or_path={tiny_model}", "--docs", str(docs)]
    assert reproduce.main(argv) == 0
    out = root / "smoke"

    # raw CSV: one row per cell x evaluated policy (SFT, pi_0, pi_1)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["cell"], int(r["iteration"])) for r in rows) == [
        ("rm_judge", -1), ("rm_judge", 0), ("rm_judge", 1), ("spa", -1), ("spa", 0), ("spa", 1)]
    for r in rows:
        summary = json.loads((Path(r["run_dir"]) / "eval" / ("init" if r["policy"] == "SFT" else r["policy"]) / "summary.json").read_text())
        assert float(r["win_rate"]) == pytest.approx(summary["win_rate"])
        assert r["status"] == "done"

    # the reward-model cell: a judge model trained in the run, its scores are the pairs' rewards
    rm_run = out / "rm_judge-s0"
    info = json.loads((rm_run / "judge_model" / "judge.json").read_text())
    assert info["kind"] == "reward_model" and info["pairs"] == 64
    ledger = json.loads((rm_run / "stages.json").read_text())["finished"]
    assert "judge_model" in ledger and "judge_1" in ledger
    from spa_ray.judging.judge_models import load_model_judge

    pairs = pq.read_table(str(rm_run / "data/iter_1/pairs/pairs.parquet")).to_pydict()
    judge = load_model_judge(rm_run / "judge_model")
    scores = judge.scores(pairs["prompt"] + pairs["prompt"], pairs["chosen"] + pairs["rejected"]).tolist()
    n = len(pairs["prompt"])
    assert pairs["reward_chosen"] == pytest.approx(scores[:n], abs=1e-5)
    assert pairs["reward_rejected"] == pytest.approx(scores[n:], abs=1e-5)
    assert all(c >= r for c, r in zip(pairs["reward_chosen"], pairs["reward_rejected"]))
    rm_row = next(r for r in rows if r["cell"] == "rm_judge" and r["iteration"] == "1")
    assert rm_row["judge_kind"] == "reward_model" and rm_row["self_refine"] == "False"
    assert rm_row["flag_precision"] == ""  # no self-refinement, no flags

    # the reward-model cell copied the SPA cell's stages up to pi_0 (run.start_from): same pi_0
    spa_ledger = json.loads((out / "spa-s0" / "stages.json").read_text())["finished"]
    assert ledger["train_0"]["copied_from"] == str(out / "spa-s0") and "copied_from" not in spa_ledger["train_0"]
    assert "copied_from" not in ledger["judge_model"] and "copied_from" not in ledger["train_1"]
    pi0 = {r["cell"]: r["win_rate"] for r in rows if r["iteration"] == "0"}
    assert pi0["rm_judge"] == pi0["spa"]

    # the SPA cell: label quality recomputed here from the labelled pairs
    spa_run = out / "spa-s0"
    assert not (spa_run / "judge_model").exists()
    labelled = pq.read_table(str(spa_run / "data/iter_1/labelled_pairs.parquet")).to_pydict()
    decided = [(c > r) for c, r in zip(labelled["gold_chosen"], labelled["gold_rejected"]) if c != r]
    spa_row = next(r for r in rows if r["cell"] == "spa" and r["iteration"] == "1")
    assert float(spa_row["agreement"]) == pytest.approx(sum(decided) / len(decided))
    assert spa_row["agreement_after"] != "" and 0.0 <= float(spa_row["agreement_after"]) <= 1.0

    # report, plots, docs page
    for name in ("win_rate_curves.png", "lc_win_rate_curves.png", "label_quality.png"):
        assert (out / "plots" / name).stat().st_size > 1000
        assert (docs.parent / "results" / f"smoke-{name}").exists()
    assert (docs.parent / "results" / "smoke.csv").read_text() == (out / "results.csv").read_text()
    page = docs.read_text()
    assert "| SPA: DE + SR + DND |" in page and "## What holds against the paper" in page
    assert "## Reading the numbers" in page  # the grid's hand-written notes, included
    assert "SPA beats the reward-model judge" in page and "benchmarks/reproduce.py" in page
    assert "not run" not in page.split("## What holds against the paper")[1].split("## Reading the numbers")[0]

    # a finished grid is not rerun: the ledgers and status files stay as they were
    before = {p: p.stat().st_mtime_ns for p in list(out.glob("*/stages.json")) + list(out.glob("_status/*.json"))}
    assert reproduce.main(argv) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
    assert not math.isnan(float(spa_row["win_rate"]))


# ------------------------------------------------------------------ sharing pi_0 between cells
def test_cells_that_differ_only_in_iteration_settings_share_the_seed_stage_cells_first():
    grid = reproduce.load_grid(REPO / "benchmarks/grids/reproduce.yaml")
    donors = reproduce.seed_stage_donors(grid, seed=0)
    shared = {"rm_judge", "llm_judge", "spa_de", "spa_de_sr", "spa", "ref_previous", "ref_none", "spa_length",
              "sel_maxmin4", "sel_keep50", "sel_keep25", "sel_random25", "sel_replay25", "sel_best"}  # issue #21: iteration settings
    assert {name for name, donor in donors.items() if donor == "dpo_seed"} == shared
    # other data (100% of the gold pairs, other seed sizes) make their own pi_0
    # and so do the variants, which change the seed stage's loss too (variant.stages=all)
    assert {name for name, donor in donors.items() if donor is None} == {
        "dpo_seed", "dpo_all", "spa_seed0.8", "spa_seed1.7", "spa_seed10",
        "var_sspo", "var_sp2dpo", "var_s_sppo", "var_wdro_dpo"}


def test_grid_scheduler_runs_two_at_a_time_and_a_cell_waits_for_its_donor(tmp_path, monkeypatch):
    """The scheduler alone: run_one replaced by a recorder that finishes runs as the driver would
    (status file + ledger), so the order and the start_from each run got are observable."""
    import threading
    import time as _time

    grid = reproduce.load_grid(REPO / "benchmarks/grids/reproduce.yaml", root=str(tmp_path))
    cells = [c for c in grid.cells if c.name in ("dpo_seed", "dpo_all", "spa", "spa_de")]
    events, lock, active = [], threading.Lock(), []

    def fake_run_one(grid_, cell, seed, in_process, log, start_from):
        with lock:
            active.append(cell.name)
            events.append(("start", cell.name, start_from.name if start_from else None, len(active)))
        _time.sleep(0.3 if cell.name == "dpo_seed" else 0.1)
        run = grid_.out / reproduce.run_name(cell, seed)
        run.mkdir(parents=True, exist_ok=True)
        iterations = reproduce.resolved_config(grid_, cell, seed).run.iterations
        (run / "stages.json").write_text(json.dumps({"finished": {f"eval_pi_{iterations}": {}}}))
        (grid_.out / "_status").mkdir(parents=True, exist_ok=True)
        (grid_.out / "_status" / f"{run.name}.json").write_text(json.dumps({"status": "done", "iterations": iterations}))
        with lock:
            active.remove(cell.name)
            events.append(("end", cell.name, None, len(active)))

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    reproduce.run_grid(grid, cells, [0], in_process=False, log=lambda m: None, jobs=2)
    starts = {name: (i, donor, n) for i, (kind, name, donor, n) in enumerate(events) if kind == "start"}
    end_donor = next(i for i, (kind, name, _, _) in enumerate(events) if kind == "end" and name == "dpo_seed")
    assert starts["spa"][1] == starts["spa_de"][1] == "dpo_seed-s0"
    assert starts["spa"][0] > end_donor and starts["spa_de"][0] > end_donor
    assert starts["dpo_all"][1] is None and starts["dpo_all"][0] < end_donor  # ran beside the donor
    assert max(n for _, _, n in starts.values()) == 2


def test_busy_wall_clock_is_the_union_of_run_intervals(tmp_path):
    status = tmp_path / "_status"
    status.mkdir(parents=True)
    # [0, 10] and [5, 20] overlap (20 s busy), [100, 130] alone (30 s): 50 s; a running one has no status yet
    for name, (start, end) in {"a": (0, 10), "b": (5, 20), "c": (100, 130)}.items():
        (status / f"{name}.json").write_text(json.dumps({"finished_at": 1e9 + end, "attempt_seconds": end - start}))

    class _Grid:
        out = tmp_path

    assert reproduce.busy_wall_seconds(_Grid()) == pytest.approx(50.0)


def test_iteration_gains_pair_each_iteration_with_the_one_before_and_fit_a_line():
    rows = [{"cell": "a", "seed": 0, "iteration": it, "win_rate": w, "agreement": ag}
            for it, w, ag in ((-1, 0.5, None), (0, 0.52, None), (1, 0.56, 0.7), (2, 0.55, 0.6))]
    rows += [{"cell": "a", "seed": 1, "iteration": 1, "win_rate": 0.6, "agreement": 0.8}]  # no pi_0 row: no point
    points = reproduce.iteration_gains(rows)
    assert [(p["seed"], p["iteration"]) for p in points] == [(0, 1), (0, 2)]
    assert [p["gain"] for p in points] == pytest.approx([0.04, -0.01])
    intercept, slope, r = reproduce.least_squares_line([0.5, 0.6, 0.7], [0.0, 0.02, 0.04])
    assert (slope, intercept, r) == pytest.approx((0.2, -0.1, 1.0))
    assert reproduce.least_squares_line([0.5, 0.6], [0.0, 0.1]) is None
    points = [{"agreement": a, "gain": g} for a, g in ((0.5, -0.02), (0.6, 0.0), (0.7, 0.02))]
    assert "crosses zero at agreement 0.600" in reproduce.gain_fit_sentence(points)
    assert reproduce.gain_fit_sentence(points[:2]) == "(too few iterations with labels for a fit)"
