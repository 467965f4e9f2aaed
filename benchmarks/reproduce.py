"""Reproduce SPA's claims on the embedded task (issue #7): one grid file -> one results table.

    nice -n 10 .venv/bin/python benchmarks/reproduce.py --grid benchmarks/grids/reproduce.yaml --jobs 2 --docs docs/results.md
    .venv/bin/python benchmarks/reproduce.py --grid benchmarks/grids/reproduce.yaml --report-only --docs docs/results.md
    .venv/bin/python benchmarks/reproduce.py --grid benchmarks/grids/reproduce.yaml --cells spa dpo_seed --seeds 0

A grid file (YAML) names a base config, the data seeds, and the cells; a cell is a name,
a label, the paper table it reproduces, and ``key.sub=value`` overrides (the same syntax
as ``jobs/spa_run.py``). Every (cell, seed) is one real run of the driver
(``jobs/spa_run.py`` in a subprocess by default, or ``run_spa`` in this process with
``--in-process``) in ``<root>/<grid>/<cell>-s<seed>``. Runs are resumable: a finished
(cell, seed) is not rerun (its status file says so and its ledger agrees); an
interrupted one resumes after its last finished stage (the driver's ledger). ``--jobs N``
runs N at a time; a cell that differs from an earlier cell only in iteration settings
copies that cell's stages up to pi_0 (``run.start_from``; ``--no-share`` to redo them).

Outputs in ``<root>/<grid>/``:
  results.csv       raw: one row per (cell, seed, evaluated policy): SFT = iteration -1,
                    pi_0 = 0, pi_t = t; win rates, length, label quality, timings
  results.md        mean +- sd over seeds per cell, claims checked against the paper
  plots/            win_rate_curves.png, lc_win_rate_curves.png (Fig. 3 style),
                    label_quality.png (headline: labels vs gold before/after refinement)
and, with ``--docs PATH``, that page (plots and CSV copied next to it, under results/).

Label quality per iteration comes from ``data/iter_t/labelled_pairs.parquet``: over the
pairs whose gold scores differ, ``agreement`` = share whose chosen response is gold's
winner (before refinement); ``agreement_after`` = the mean probability the refined loss
puts on gold's winner (1 or 0 for unflagged pairs, 1-alpha or alpha for flagged ones,
Eq. 10); ``flag_precision`` = share of flagged pairs (z = 1) that were really
mislabelled, against the base rate ``1 - agreement``; ``flag_recall`` = share of the
mislabelled pairs that were flagged.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSV_COLUMNS = [
    "cell", "label", "table", "seed", "iteration", "policy", "status",
    "win_rate", "lc_win_rate", "mean_length", "gold_score",
    "judge_health", "pairs", "ties", "agreement", "agreement_after", "flag_rate", "flag_precision", "flag_recall",
    "flag_lift", "flagged_pairs", "decided_pairs", "alpha", "judge_kind", "self_refine", "decoupled_noise_detection",
    "judge_reference", "seed_fraction", "length_penalty", "variant", "run_seconds", "run_dir",
    # issue #21: which pairs were trained on, and how sure the judge was of them
    "pair_rule", "responses_per_prompt", "keep_fraction", "keep_by", "seed_replay", "judged_pairs", "replayed_pairs",
    "agreement_judged", *[f"agreement_top{round(100 * f)}" for f in (0.5, 0.25, 0.1)],
]

#: kept fractions of the agreement-vs-margin curve (agreement of the top f of judged pairs by margin)
KEPT_FRACTIONS = (1.0, 0.5, 0.25, 0.1)


# --------------------------------------------------------------------------- grid
@dataclass
class Cell:
    name: str
    label: str
    table: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Grid:
    name: str
    path: Path
    root: Path
    seeds: list[int]
    base_config: str | None
    base_overrides: list[str]
    cells: list[Cell]
    claims: list[dict]
    raw: dict

    @property
    def out(self) -> Path:
        return self.root / self.name


def load_grid(path: str | Path, root: str | None = None, extra_overrides: list[str] | None = None) -> Grid:
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(raw) - {"name", "root", "seeds", "base_config", "base_overrides", "cells", "claims", "description",
                          "notes"}
    if unknown:
        raise SystemExit(f"{path}: unknown grid keys {sorted(unknown)}")
    cells = []
    for i, c in enumerate(raw.get("cells") or []):
        if not isinstance(c, dict) or "name" not in c:
            raise SystemExit(f"{path}: cells[{i}] needs a name")
        extra = set(c) - {"name", "label", "table", "overrides"}
        if extra:
            raise SystemExit(f"{path}: cells[{i}] ({c['name']}): unknown keys {sorted(extra)}")
        cells.append(Cell(str(c["name"]), str(c.get("label", c["name"])), str(c.get("table", "")), list(c.get("overrides") or [])))
    names = [c.name for c in cells]
    if len(set(names)) != len(names) or not names:
        raise SystemExit(f"{path}: cell names must be unique and at least one cell given, got {names}")
    base_config = raw.get("base_config")
    if base_config and not Path(base_config).is_absolute():
        base_config = str((REPO / base_config).resolve())
    return Grid(
        name=str(raw.get("name") or path.stem), path=path.resolve(),
        root=Path(root or raw.get("root") or "runs/reproduce").resolve(),
        seeds=[int(s) for s in raw.get("seeds") or [0]], base_config=base_config,
        base_overrides=list(raw.get("base_overrides") or []) + list(extra_overrides or []),
        cells=cells, claims=list(raw.get("claims") or []), raw=raw,
    )


def run_name(cell: Cell, seed: int) -> str:
    return f"{cell.name}-s{seed}"


def run_overrides(grid: Grid, cell: Cell, seed: int, start_from: Path | None = None) -> list[str]:
    out = [*grid.base_overrides, *cell.overrides, f"run.root={grid.out}", f"run.name={run_name(cell, seed)}", f"run.seed={seed}"]
    return out + ([f"run.start_from={start_from}"] if start_from else [])


def seed_stage_donors(grid: Grid, seed: int) -> dict[str, str | None]:
    """Per cell, the first earlier cell of the grid whose stages up to pi_0 it may copy
    (``run.start_from``: the two configs differ only in iteration settings), else None.
    Donors are cells without a donor of their own, so a cell waits for at most one run."""
    from spa_ray.pipeline.config import config_to_dict
    from spa_ray.pipeline.start_from import seed_stage_differences

    configs = {c.name: config_to_dict(resolved_config(grid, c, seed)) for c in grid.cells}
    donors: dict[str, str | None] = {}
    for i, cell in enumerate(grid.cells):
        donors[cell.name] = next((d.name for d in grid.cells[:i] if donors[d.name] is None
                                  and not seed_stage_differences(configs[d.name], configs[cell.name])), None)
    return donors


def resolved_config(grid: Grid, cell: Cell, seed: int, start_from: Path | None = None):
    from spa_ray.pipeline.config import load_config

    return load_config(grid.base_config, run_overrides(grid, cell, seed, start_from))


# --------------------------------------------------------------------------- running
def _status_path(grid: Grid, name: str) -> Path:
    return grid.out / "_status" / f"{name}.json"


def read_status(grid: Grid, name: str) -> dict | None:
    p = _status_path(grid, name)
    return json.loads(p.read_text()) if p.exists() else None


#: run statuses whose results count (a stopped run ended on purpose, e.g. the judge health floor)
FINISHED = ("done", "stopped")


def finished_rows(rows: list[dict]) -> list[dict]:
    """The CSV rows of finished runs: what tables, claims and plots are made from."""
    return [r for r in rows if r["status"] in FINISHED]


def is_variant_row(row: dict) -> bool:
    """A row of a variant cell (SSPO, SP2DPO, S-SPPO, WDRO-DPO), not of SPA itself."""
    return row.get("variant") not in (None, "", "spa")


def is_finished(grid: Grid, cell: Cell, seed: int) -> bool:
    """Finished = the status file says done/stopped AND the run's ledger has its last evaluation
    (or the health-check stop that ended it)."""
    status = read_status(grid, run_name(cell, seed))
    if not status or status.get("status") not in FINISHED:
        return False
    ledger = grid.out / run_name(cell, seed) / "stages.json"
    if not ledger.exists():
        return False
    finished = json.loads(ledger.read_text())["finished"]
    if status["status"] == "stopped":
        return True
    return f"eval_pi_{status['iterations']}" in finished


def run_one(grid: Grid, cell: Cell, seed: int, in_process: bool, log=print, start_from: Path | None = None) -> dict:
    name = run_name(cell, seed)
    config = resolved_config(grid, cell, seed, start_from)  # validates before anything runs
    (grid.out / "_status").mkdir(parents=True, exist_ok=True)
    (grid.out / "_logs").mkdir(parents=True, exist_ok=True)
    log_path = grid.out / "_logs" / f"{name}.log"
    previous = read_status(grid, name) or {}
    started = time.time()
    log(f"[{time.strftime('%H:%M:%S')}] run {name}: {' '.join(cell.overrides) or '(base config)'}"
        + (f" (seed stages from {start_from.name})" if start_from else ""))
    if in_process:
        from spa_ray.pipeline.driver import run_spa

        try:
            rc = run_spa(config)
        except Exception as exc:  # recorded, the grid goes on
            rc = 1
            log_path.write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
            log(f"  {name} failed: {type(exc).__name__}: {exc}")
    else:
        cmd = [sys.executable, str(REPO / "jobs" / "spa_run.py")]
        if grid.base_config:
            cmd += ["--config", grid.base_config]
        cmd += run_overrides(grid, cell, seed, start_from)
        env = dict(os.environ)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # else every ray.train.report waits ~2 s
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    seconds = time.time() - started
    status = {0: "done", 3: "stopped"}.get(rc, "failed")
    record = {
        "status": status, "returncode": rc, "iterations": config.run.iterations,
        "seconds": seconds + float(previous.get("seconds", 0.0)) if previous.get("status") == "failed" else seconds,
        "attempt_seconds": seconds, "finished_at": time.time(), "log": str(log_path), "overrides": cell.overrides,
    }
    _status_path(grid, name).write_text(json.dumps(record, indent=2), encoding="utf-8")
    log(f"[{time.strftime('%H:%M:%S')}] run {name}: {status} (rc {rc}) in {seconds:.0f}s")
    return record


def run_grid(grid: Grid, cells: list[Cell], seeds: list[int], in_process: bool, log=print,
             jobs: int = 1, share: bool = True) -> None:
    """Every (cell, seed) not finished yet, ``jobs`` at a time, seed-major (a partial grid
    already has every cell of the first seeds). With ``share``, a cell with a donor
    (``seed_stage_donors``) waits for it and copies its stages up to pi_0; if the donor
    failed or is not part of this call and not finished, the cell runs from scratch."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    if in_process and jobs > 1:
        raise SystemExit("--in-process runs one run at a time (one Ray driver per process); drop --jobs")
    pending = []
    for seed in seeds:
        for cell in cells:
            if is_finished(grid, cell, seed):
                log(f"run {run_name(cell, seed)}: finished before, not rerun")
            else:
                pending.append((seed, cell))
    donors = {seed: seed_stage_donors(grid, seed) if share else {} for seed in seeds}
    by_name = {c.name: c for c in grid.cells}
    running: dict = {}

    def donor_state(seed: int, cell: Cell) -> tuple[str, Path | None]:
        donor = donors[seed].get(cell.name)
        if donor is None:
            return "ready", None
        if is_finished(grid, by_name[donor], seed):
            return "ready", grid.out / run_name(by_name[donor], seed)
        if any(s == seed and c.name == donor for s, c in pending + list(running.values())):
            return "wait", None
        return "ready", None  # failed, or not run in this call: from scratch

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for task in list(pending):
                if len(running) >= jobs:
                    break
                state, start_from = donor_state(*task)
                if state == "ready":
                    pending.remove(task)
                    seed, cell = task
                    running[pool.submit(run_one, grid, cell, seed, in_process, log, start_from)] = task
            if not running:  # every pending task waits on a donor that is neither pending nor running
                raise RuntimeError(f"grid scheduler: nothing runnable among {[run_name(c, s) for s, c in pending]}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                future.result()


# --------------------------------------------------------------------------- collecting
def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pydict()


def label_quality(path: Path, alpha: float) -> dict[str, float]:
    """Agreement with gold before/after refinement and flag quality (module docstring), over
    the self-labelled pairs (replayed gold seed pairs, ``source`` seed, are left out)."""
    t = _read_parquet(path)
    if "gold_chosen" not in t:
        return {}
    if "source" in t:
        mine = [i for i, s in enumerate(t["source"]) if s == "self"]
        t = {k: [v[i] for i in mine] for k, v in t.items()}
    decided = [i for i, (c, r) in enumerate(zip(t["gold_chosen"], t["gold_rejected"])) if c != r]
    out: dict[str, float] = {"decided_pairs": len(decided)}
    if not decided:
        return out
    correct = {i: t["gold_chosen"][i] > t["gold_rejected"][i] for i in decided}
    out["agreement"] = sum(correct.values()) / len(decided)
    z = t.get("z")
    if z is None:
        return out
    known = [i for i in decided if z[i] is not None]
    if not known:
        return out
    flagged = [i for i in known if z[i]]
    wrong = [i for i in known if not correct[i]]
    out["flag_rate"] = len(flagged) / len(known)
    out["flagged_pairs"] = len(flagged)
    if flagged:
        out["flag_precision"] = sum(not correct[i] for i in flagged) / len(flagged)
    if wrong:
        out["flag_recall"] = sum(bool(z[i]) for i in wrong) / len(wrong)
    target = []
    for i in known:
        if z[i]:
            target.append(1.0 - alpha if correct[i] else alpha)
        else:
            target.append(1.0 if correct[i] else 0.0)
    out["agreement_after"] = sum(target) / len(target)
    if "flag_precision" in out:
        out["flag_lift"] = out["flag_precision"] - (1.0 - out["agreement"])
    return out


def agreement_by_margin(path: Path) -> dict[str, float]:
    """From judge_t's ``judged.parquet`` (every judged pair, its margin, gold scores): the
    agreement with gold of the top f of pairs by margin, for f in KEPT_FRACTIONS (pairs gold
    ties are left out of each share, as everywhere)."""
    t = _read_parquet(path)
    if "gold_chosen" not in t or not t["margin"]:
        return {}
    order = sorted(range(len(t["margin"])), key=lambda i: (-t["margin"][i], i))
    out = {}
    for f in KEPT_FRACTIONS:
        top = [i for i in order[:round(f * len(order))] if t["gold_chosen"][i] != t["gold_rejected"][i]]
        if top:
            key = "agreement_judged" if f == 1.0 else f"agreement_top{round(100 * f)}"
            out[key] = sum(t["gold_chosen"][i] > t["gold_rejected"][i] for i in top) / len(top)
    return out


def collect_run(grid: Grid, cell: Cell, seed: int) -> list[dict]:
    name = run_name(cell, seed)
    run = grid.out / name
    status = read_status(grid, name) or {}
    if not (run / "stages.json").exists():
        return []
    ledger = json.loads((run / "stages.json").read_text())["finished"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    tr, jd = config["training"], config["judge"]
    base = {
        "cell": cell.name, "label": cell.label, "table": cell.table, "seed": seed, "status": status.get("status", "partial"),
        "alpha": tr["alpha"], "judge_kind": jd["kind"], "self_refine": tr["self_refine"],
        "decoupled_noise_detection": tr["decoupled_noise_detection"], "judge_reference": jd["reference"],
        "seed_fraction": (config["data"].get("task_kwargs") or {}).get("seed_fraction", 0.033)
        if config["data"].get("gold_pairs", "seed") == "seed" else 1.0,
        "length_penalty": jd["length_penalty"], "variant": (config.get("variant") or {}).get("name", "spa"),
        "run_seconds": status.get("seconds"), "run_dir": str(run),
        "pair_rule": jd.get("pair_rule", "first_two"), "keep_fraction": jd.get("keep_fraction", 1.0),
        "keep_by": jd.get("keep_by", "margin"),
        "responses_per_prompt": config["generation"]["responses_per_prompt"],
        "seed_replay": tr.get("seed_replay", 0.0),
    }
    rows = []
    policies = [("init", -1), ("pi_0", 0)] + [(f"pi_{t}", t) for t in range(1, int(config["run"]["iterations"]) + 1)]
    for policy, it in policies:
        if f"eval_{policy}" not in ledger:
            continue
        summary = json.loads((run / "eval" / policy / "summary.json").read_text())
        row = {**base, "iteration": it, "policy": "SFT" if policy == "init" else policy, **summary}
        if it >= 1:
            judge = ledger.get(f"judge_{it}", {})
            row["pairs"], row["ties"] = judge.get("pairs"), judge.get("ties")
            row["agreement"] = judge.get("gold_agreement")
            row["judge_health"] = ledger.get(f"health_{it}", {}).get("accuracy")
            row["judged_pairs"], row["replayed_pairs"] = judge.get("judged_pairs"), judge.get("replayed")
            labelled = run / "data" / f"iter_{it}" / "labelled_pairs.parquet"
            if labelled.exists():
                row.update(label_quality(labelled, float(tr["alpha"])))
            judged = run / "data" / f"iter_{it}" / "pairs" / "judged.parquet"
            if judged.exists():
                row.update(agreement_by_margin(judged))
        rows.append({k: row.get(k) for k in CSV_COLUMNS})
    return rows


#: per-step numbers a variant's objective logs (train_log.jsonl), averaged over a stage
VARIANT_STEP_KEYS = ("beta_mean", "beta_min", "sspo_delta", "sspo_g", "sspo_unpaired_above", "sppo_gate_mean",
                     "sppo_repulsion", "wdro_weight_mean", "wdro_weight_max", "wdro_moved_pairs")
#: per-stage numbers a variant's preparation records (checkpoints/pi_t/variant.json)
VARIANT_STAGE_KEYS = ("beta_mean", "beta_min", "beta_max", "unpaired", "g_min", "similarity_mean", "gated_pairs",
                      "pairs")


def variant_diagnostics(finished: list[dict]) -> list[dict]:
    """What each variant did per training stage and seed: its preparation's numbers
    (``variant.json``, prefixed ``prep_``) and its objective's per-step numbers averaged
    over the stage's steps (``train_log.jsonl``). Finished runs of variant cells only."""
    runs = sorted({(r["cell"], int(r["seed"]), r["run_dir"]) for r in finished if is_variant_row(r)})
    out = []
    for cell, seed, run_dir in runs:
        for stage in sorted((Path(run_dir) / "checkpoints").glob("pi_*"), key=lambda p: int(p.name[3:])):
            row: dict[str, Any] = {"cell": cell, "seed": seed, "stage": int(stage.name[3:])}
            info = stage / "variant.json"
            if info.exists():
                prep = json.loads(info.read_text())
                row.update({f"prep_{k}": prep[k] for k in VARIANT_STAGE_KEYS if isinstance(prep.get(k), (int, float))})
            log = stage / "train_log.jsonl"
            steps = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
            for key in VARIANT_STEP_KEYS:
                values = [float(s[key]) for s in steps if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])]
                if values:
                    row[key] = sum(values) / len(values)
            row["steps"] = len(steps)
            out.append(row)
    return out


def variant_table(diagnostics: list[dict]) -> str:
    """One line per (variant cell, stage): each number as mean ± sd over seeds."""
    if not diagnostics:
        return "(no finished variant runs)"
    lines = ["| cell | stage | seeds | steps | what the variant did (mean ± sd over seeds) |", "|---|---|---|---|---|"]
    for cell, stage in sorted({(d["cell"], d["stage"]) for d in diagnostics}):
        ds = [d for d in diagnostics if d["cell"] == cell and d["stage"] == stage]
        keys = [k for k in ds[0] if k not in ("cell", "seed", "stage", "steps")]
        parts = []
        for k in keys:
            values = [d[k] for d in ds if k in d]
            counts = all(float(v).is_integer() for v in values) and not k.startswith(("wdro_", "sspo_", "sppo_"))
            parts.append(f"{k} {fmt(*mean_sd(values), digits=0 if counts else 3)}")
        steps = sorted({d["steps"] for d in ds})
        lines.append(f"| {cell} | pi_{stage} | {len(ds)} | {'-'.join(str(n) for n in (steps[0], steps[-1])[:len(steps)])} "
                     f"| {'; '.join(parts)} |")
    return "\n".join(lines)


def collect(grid: Grid, reuse_csv: Path | None = None) -> list[dict]:
    """Every (cell, seed)'s rows from its run directory; with ``reuse_csv`` (an earlier
    report's raw CSV), the rows of runs whose directory is not on this machine come from it,
    marked ``reused`` (their figures are those of the commit that made that CSV)."""
    reused = {}
    if reuse_csv is not None:
        for r in read_csv(reuse_csv):
            reused.setdefault((r["cell"], int(r["seed"])), []).append(r)
    rows = []
    for cell in grid.cells:
        for seed in grid.seeds:
            mine = collect_run(grid, cell, seed)
            if not mine and (cell.name, seed) in reused:
                mine = [{**{k: r.get(k) for k in CSV_COLUMNS}, "reused": True} for r in reused[(cell.name, seed)]]
            rows += mine
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in ("seed", "iteration"):
                    row[k] = int(v)
                else:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out


# --------------------------------------------------------------------------- summarising
def _values(rows, cell, metric, where) -> dict[int, float]:
    """{seed: value} of `metric` for `cell` at `where` (an iteration, or 'final' = the last evaluated one)."""
    by_seed: dict[int, list[dict]] = {}
    for r in rows:
        if r["cell"] == cell:
            by_seed.setdefault(int(r["seed"]), []).append(r)
    out = {}
    for seed, rs in by_seed.items():
        rs = sorted(rs, key=lambda r: int(r["iteration"]))
        pick = rs[-1] if where == "final" else next((r for r in rs if int(r["iteration"]) == int(where)), None)
        if pick is not None and pick.get(metric) is not None and not (isinstance(pick[metric], float) and math.isnan(pick[metric])):
            out[seed] = float(pick[metric])
    return out


def mean_sd(values) -> tuple[float, float, int]:
    values = list(values)
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan), len(values)


def fmt(m: float, s: float, n: int, digits: int = 3) -> str:
    if n == 0 or math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if n == 1 or math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _parse_ref(ref: str) -> tuple[str, Any]:
    cell, _, where = ref.partition("@")
    where = where or "final"
    where = {"sft": -1, "pi0": 0}.get(where, where)
    return cell, where if where == "final" else int(where)


def check_claim(rows: list[dict], claim: dict) -> dict:
    """A paper claim 'a op b' on `metric`, paired by seed: holds / within noise / does not hold."""
    metric = claim.get("metric", "win_rate")
    a_cell, a_at = _parse_ref(str(claim["a"]))
    a = _values(rows, a_cell, metric, a_at)
    if isinstance(claim["b"], (int, float)):  # a constant, e.g. 0.5 or 0
        b = {s: float(claim["b"]) for s in a}
    else:
        b_cell, b_at = _parse_ref(str(claim["b"]))
        b = _values(rows, b_cell, metric, b_at)
    seeds = sorted(set(a) & set(b))
    sign = 1.0 if claim.get("op", ">") == ">" else -1.0
    out = {**claim, "metric": metric, "seeds": len(seeds)}
    if not seeds:
        return {**out, "verdict": "not run", "diff": None}
    diffs = [a[s] - b[s] for s in seeds]
    m, sd, n = mean_sd(diffs)
    out.update(diff=m, diff_sd=sd, a_mean=statistics.fmean(a[s] for s in seeds), b_mean=statistics.fmean(b[s] for s in seeds))
    if n < 2:
        out["verdict"] = ("direction holds" if sign * m > 0 else "direction does not hold") + " (1 seed, no spread)"
        return out
    se = sd / math.sqrt(n)
    if sign * m > 2 * se and sign * m > 0:
        out["verdict"] = "holds"
    elif sign * m > 0:
        out["verdict"] = "direction holds, within noise"
    elif -sign * m > 2 * se:
        out["verdict"] = "does not hold (opposite)"
    else:
        out["verdict"] = "does not hold, within noise"
    return out


def cell_summary(rows: list[dict], grid: Grid) -> list[dict]:
    out = []
    first = next((c for c in grid.cells if any(r["cell"] == c.name for r in rows)), None)
    if first is not None:  # pi_init against its own samples (other seeds): the 0.5 line, measured
        sft = {"cell": "sft", "label": "SFT (pi_init)", "table": "1", "final_iteration": -1,
               "seeds": len({int(r["seed"]) for r in rows if r["cell"] == first.name})}
        for metric in ("win_rate", "lc_win_rate", "mean_length"):
            sft[metric] = mean_sd(_values(rows, first.name, metric, -1).values())
        for metric in ("pi0_win_rate", "agreement", "agreement_after", "flag_precision", "seconds"):
            sft[metric] = (math.nan, math.nan, 0)
        out.append(sft)
    for cell in grid.cells:
        rs = [r for r in rows if r["cell"] == cell.name]
        if not rs:
            out.append({"cell": cell.name, "label": cell.label, "table": cell.table, "seeds": 0})
            continue
        final_it = max(int(r["iteration"]) for r in rs)
        summary = {"cell": cell.name, "label": cell.label, "table": cell.table, "final_iteration": final_it}
        for metric in ("win_rate", "lc_win_rate", "mean_length"):
            summary[metric] = mean_sd(_values(rows, cell.name, metric, "final").values())
        summary["sft_win_rate"] = mean_sd(_values(rows, cell.name, "win_rate", -1).values())
        summary["pi0_win_rate"] = mean_sd(_values(rows, cell.name, "win_rate", 0).values())
        for metric in ("agreement", "agreement_after", "flag_precision"):
            summary[metric] = mean_sd(_values(rows, cell.name, metric, "final").values())
        seconds = {int(r["seed"]): r["run_seconds"] for r in rs if r.get("run_seconds") is not None}
        summary["seconds"] = mean_sd(seconds.values())
        summary["seeds"] = len({int(r["seed"]) for r in rs})
        summary["statuses"] = sorted({str(r["status"]) for r in rs})
        out.append(summary)
    return out


def markdown_table(summary: list[dict]) -> str:
    head = ("| cell | paper | seeds | final policy | gold win rate | LC win rate | length | pi_0 win rate "
            "| label agreement | after refinement | flag precision | minutes/run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        if not s.get("seeds"):
            lines.append(f"| {s['label']} | {s['table']} | 0 | not run | - | - | - | - | - | - | - | - |")
            continue
        it = s["final_iteration"]
        pol = {-1: "pi_init", 0: "pi_0"}.get(it, f"pi_{it}")
        mins = s["seconds"]
        lines.append(
            f"| {s['label']} | {s['table']} | {s['seeds']} | {pol} | {fmt(*s['win_rate'])} | {fmt(*s['lc_win_rate'])} "
            f"| {fmt(*s['mean_length'], digits=1)} | {fmt(*s['pi0_win_rate'])} | {fmt(*s['agreement'])} | {fmt(*s['agreement_after'])} "
            f"| {fmt(*s['flag_precision'])} | {fmt(mins[0] / 60, mins[1] / 60, mins[2], digits=1)} |"
        )
    return "\n".join(lines)


def selection_table(rows: list[dict], grid: Grid) -> str:
    """Issue #21's cells beside SPA and the seed DPO: win rates per iteration, the pairs each
    iteration trained on and their agreement with gold (mean ± sd over seeds)."""
    names = ["dpo_seed", "spa"] + [c.name for c in grid.cells if c.table == "#21"]
    cells = [c for c in grid.cells if c.name in names and any(r["cell"] == c.name for r in rows)]
    its = sorted({int(r["iteration"]) for r in rows if r["cell"] in names and int(r["iteration"]) >= 1})
    head = (["cell", "seeds", "pi_0 win rate"] + [f"pi_{t} win rate" for t in its] + ["final LC win rate"]
            + [f"pairs trained on, it {t}" for t in its] + [f"their agreement, it {t}" for t in its]
            + ["minutes/run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        seeds = len({int(r["seed"]) for r in rows if r["cell"] == cell.name})
        cells_ = [cell.label, str(seeds), fmt(*mean_sd(_values(rows, cell.name, "win_rate", 0).values()))]
        cells_ += [fmt(*mean_sd(_values(rows, cell.name, "win_rate", t).values())) for t in its]
        cells_ += [fmt(*mean_sd(_values(rows, cell.name, "lc_win_rate", "final").values()))]
        cells_ += [fmt(*mean_sd(_values(rows, cell.name, "pairs", t).values()), digits=0) for t in its]
        cells_ += [fmt(*mean_sd(_values(rows, cell.name, "agreement", t).values())) for t in its]
        secs = {int(r["seed"]): float(r["run_seconds"]) / 60 for r in rows
                if r["cell"] == cell.name and r.get("run_seconds") not in (None, "")}
        cells_ += [fmt(*mean_sd(secs.values()), digits=1)]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def claims_table(verdicts: list[dict]) -> str:
    lines = ["| paper | claim | metric | a | b | a - b (mean ± sd over seeds) | seeds | verdict |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        d = "-" if v.get("diff") is None else fmt(v["diff"], v.get("diff_sd", math.nan), v["seeds"])
        a = "-" if v.get("a_mean") is None else f"{v['a']} = {v['a_mean']:.3f}"
        b = "-" if v.get("b_mean") is None else f"{v['b']} = {v['b_mean']:.3f}"
        lines.append(f"| {v.get('table', '')} | {v.get('claim', '')} | {v['metric']} | {a} | {b} | {d} | {v['seeds']} | {v['verdict']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _save(fig, path: Path, made: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)


def plots(rows: list[dict], grid: Grid, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    tables = list(dict.fromkeys(c.table for c in grid.cells))
    for metric, fname, ylabel in (("win_rate", "win_rate_curves.png", "gold win rate vs pi_init"),
                                  ("lc_win_rate", "lc_win_rate_curves.png", "LC win rate vs pi_init")):
        n = len(tables)
        cols = min(3, n)
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
        for ax, table in zip(axes.flat, tables):
            for cell in [c for c in grid.cells if c.table == table]:
                its = sorted({int(r["iteration"]) for r in rows if r["cell"] == cell.name})
                if not its:
                    continue
                stats = [mean_sd(_values(rows, cell.name, metric, it).values()) for it in its]
                ms = [s[0] for s in stats]
                sds = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
                line, = ax.plot(its, ms, marker="o", label=cell.label)
                ax.fill_between(its, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                                color=line.get_color(), alpha=0.15)
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title(f"paper: {table}" if table else "")
            ax.set_xlabel("iteration (-1 = SFT, 0 = seed DPO)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        _save(fig, out / fname, made)

    # headline: label quality per iteration, before and after refinement
    lq = [r for r in rows if int(r["iteration"]) >= 1 and r.get("agreement") is not None]
    cells = [c for c in grid.cells if any(r["cell"] == c.name for r in lq)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    its = sorted({int(r["iteration"]) for r in lq})
    width = 0.8 / max(1, len(cells))
    for k, cell in enumerate(cells):
        ms, sds = [], []
        for it in its:
            m, s, _ = mean_sd(_values(rows, cell.name, "agreement", it).values())
            ms.append(m)
            sds.append(0.0 if math.isnan(s) else s)
        ax.bar([i + k * width for i in range(len(its))], ms, width, yerr=sds, label=cell.label, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(cells) - 1) / 2 for i in range(len(its))], [f"iteration {i}" for i in its])
    ax.set_ylabel("labels agreeing with gold (before refinement)")
    ax.set_title("who labels: agreement with the gold judge")
    ax.legend(fontsize=7)
    ax = axes[1]
    refined = [c for c in cells if any(r["cell"] == c.name and r.get("flag_precision") is not None for r in lq)]
    series = (("agreement", "agreement before"), ("agreement_after", "agreement after (Eq. 10 soft labels)"),
              ("flag_precision", "flagged pairs really mislabelled"), (None, "base rate: 1 - agreement"))
    groups = [(c, it) for c in refined for it in its]
    width = 0.8 / len(series)
    for k, (metric, name) in enumerate(series):
        ms, sds = [], []
        for c, it in groups:
            vals = _values(rows, c.name, metric or "agreement", it).values()
            vals = [1 - v for v in vals] if metric is None else list(vals)
            m, s, _ = mean_sd(vals)
            ms.append(m)
            sds.append(0.0 if math.isnan(s) else s)
        ax.bar([i + k * width for i in range(len(groups))], ms, width, yerr=sds, label=name, capsize=2)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))],
                  [f"{c.name} it {it}" for c, it in groups], fontsize=7, rotation=35, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("self-refinement: do the flags find the wrong labels?")
    ax.legend(fontsize=7)
    _save(fig, out / "label_quality.png", made)

    curves = [r for r in rows if int(r["iteration"]) >= 1 and r.get("agreement_judged") is not None]
    if curves:  # how sure the judge is against how right: agreement of the top f of pairs by margin
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for rule in sorted({str(r.get("pair_rule") or "first_two") for r in curves}):
            for it in sorted({int(r["iteration"]) for r in curves}):
                mine = [r for r in curves if int(r["iteration"]) == it and str(r.get("pair_rule") or "first_two") == rule]
                keys = ["agreement_judged"] + [f"agreement_top{round(100 * f)}" for f in KEPT_FRACTIONS[1:]]
                stats = [mean_sd(float(r[k]) for r in mine if r.get(k) is not None) for k in keys]
                ms = [m for m, _, _ in stats]
                sds = [0.0 if math.isnan(sd) else sd for _, sd, _ in stats]
                ax.errorbar(KEPT_FRACTIONS, ms, yerr=sds, marker="o", capsize=3,
                            label=f"{rule}, iteration {it} ({len(mine)} runs)")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(KEPT_FRACTIONS, [f"{f:g}" for f in KEPT_FRACTIONS])
        ax.invert_xaxis()
        ax.set_xlabel("kept fraction of the iteration's pairs (largest |margin| first)")
        ax.set_ylabel("kept pairs agreeing with gold")
        ax.set_title("the confidence filter: agreement against kept fraction")
        ax.legend(fontsize=7)
        _save(fig, out / "agreement_vs_kept.png", made)

    points = iteration_gains(rows)
    if points:  # why an iteration helps or not: its gain against the quality of its labels
        fig, ax = plt.subplots(figsize=(10, 4.8))
        shown = [c for c in grid.cells if any(p["cell"] == c.name for p in points)]
        for k, cell in enumerate(shown):
            mine = [p for p in points if p["cell"] == cell.name]
            ax.scatter([p["agreement"] for p in mine], [p["gain"] for p in mine], s=22, label=cell.label,
                       color=plt.get_cmap("tab20")(k % 20), marker="osD^v<>"[k % 7])
        fit = least_squares_line([p["agreement"] for p in points], [p["gain"] for p in points])
        if fit is not None:
            xs = [min(p["agreement"] for p in points), max(p["agreement"] for p in points)]
            ax.plot(xs, [fit[0] + fit[1] * x for x in xs], color="black", lw=1,
                    label=f"least squares: slope {fit[1]:.2f}, r = {fit[2]:.2f}, n = {len(points)}")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("iteration t's labels agreeing with gold")
        ax.set_ylabel("win rate of pi_t minus pi_(t-1)")
        ax.set_title("does an iteration help? its gain against its label quality")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        _save(fig, out / "gain_vs_agreement.png", made)
    return made


def iteration_gains(rows: list[dict]) -> list[dict]:
    """One point per (cell, seed, iteration t >= 1) with labels: gold agreement of iteration t's
    labels and the win-rate change pi_(t-1) -> pi_t of the same run."""
    by_run = {}
    for r in rows:
        by_run.setdefault((r["cell"], int(r["seed"])), {})[int(r["iteration"])] = r
    points = []
    for (cell, seed), its in sorted(by_run.items()):
        for t, r in sorted(its.items()):
            prev = its.get(t - 1)
            if t >= 1 and prev is not None and r.get("agreement") not in (None, "") and r.get("win_rate") not in (None, ""):
                points.append({"cell": cell, "seed": seed, "iteration": t, "agreement": float(r["agreement"]),
                               "gain": float(r["win_rate"]) - float(prev["win_rate"])})
    return points


def gain_fit_sentence(points: list[dict]) -> str:
    """The fit behind gain_vs_agreement.png in words, with where the line crosses zero."""
    fit = least_squares_line([p["agreement"] for p in points], [p["gain"] for p in points])
    if fit is None:
        return "(too few iterations with labels for a fit)"
    intercept, slope, r = fit
    zero = f"; the line crosses zero at agreement {-intercept / slope:.3f}" if slope > 0 else ""
    return (f"Least squares over {len(points)} iterations: win-rate change = {intercept:.3f} + {slope:.3f} × agreement, "
            f"r = {r:.2f}{zero}. One run's win rate has a standard error of about 0.016, so a single point is noisy.")


def least_squares_line(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """(intercept, slope, Pearson r) of y on x; None with fewer than 3 points or no spread."""
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return my - sxy / sxx * mx, sxy / sxx, sxy / math.sqrt(sxx * syy)


# --------------------------------------------------------------------------- reports
def machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import cpu_model

    cpu = cpu_model()
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}){mem}, Python {platform.python_version()}"


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO), text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def busy_wall_seconds(grid: Grid) -> float:
    """Wall clock during which at least one grid run was going: the union of the runs'
    [start, end] intervals (last attempt each, from _status/), so the gaps between sessions
    and the overlap of ``--jobs`` runs are not counted."""
    spans = []
    for path in (grid.out / "_status").glob("*.json"):
        st = json.loads(path.read_text())
        if st.get("finished_at") and st.get("attempt_seconds") is not None:
            spans.append((st["finished_at"] - st["attempt_seconds"], st["finished_at"]))
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def report(grid: Grid, rows: list[dict], command: str, docs: Path | None, log=print) -> dict[str, Path]:
    out = grid.out
    write_csv(rows, out / "results.csv")  # raw: unfinished runs too, with their status
    finished = finished_rows(rows)  # tables, claims, plots: finished runs only
    summary = cell_summary(finished, grid)
    verdicts = [check_claim(finished, c) for c in grid.claims]
    made = plots(finished, grid, out / "plots") if finished else []
    total_s = sum(float(r["run_seconds"]) for r in {(r["cell"], r["seed"]): r for r in rows}.values() if r.get("run_seconds"))
    body = [
        f"# Reproduction grid `{grid.name}`",
        "",
        f"Grid file `{_rel(grid.path)}`, data seeds {grid.seeds}, commit `{_git_commit()}`, {time.strftime('%Y-%m-%d')}.",
        f"Machine: {machine()}. Run time summed over runs: {total_s / 3600:.2f} h.",
        "",
        "Each row: mean ± sd over data seeds at the cell's last evaluated policy; win rates are over",
        "pi_init's own samples on held-out prompts (gold judge, ties half). Label columns are for the",
        "last iteration (see benchmarks/reproduce.py for their definitions).",
        "",
        markdown_table(summary),
        "",
        "## Claims of the paper, checked",
        "",
        claims_table(verdicts) if verdicts else "(no claims listed in the grid file)",
        "",
    ]
    (out / "results.md").write_text("\n".join(body), encoding="utf-8")
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    if docs is not None:
        write_docs(grid, rows, summary, verdicts, made, command, total_s, docs)
        paths["docs"] = docs
    log(f"wrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {docs}" if docs else ""))
    return paths


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def write_docs(grid, rows, summary, verdicts, made, command, total_s, docs: Path) -> None:
    docs = Path(docs)
    assets = docs.parent / "results"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy2(grid.out / "results.csv", assets / f"{grid.name}.csv")
    images = []
    for p in made:
        dst = assets / f"{grid.name}-{p.name}"
        shutil.copy2(p, dst)
        images.append(dst)
    statuses = {(r["cell"], r["seed"]): r["status"] for r in rows}
    reused_runs = {(r["cell"], r["seed"]) for r in rows if r.get("reused")}
    not_done = sorted(f"{c}-s{s}" for (c, s), st in statuses.items() if st not in FINISHED)
    expected = len(grid.cells) * len(grid.seeds)
    text = [
        "# Reproducing SPA's claims on the embedded task",
        "",
        "<!-- Generated by benchmarks/reproduce.py from its own output; edit the grid file or the",
        "     script, not this page. -->",
        "",
    ]
    finished = sum(st in FINISHED for st in statuses.values())
    done_rows = finished_rows(rows)
    if finished < expected:
        text += [f"**Partial: {finished} of {expected} runs finished.** Cells with fewer seeds than the grid's are",
                 "not comparable yet. The first command below completes the grid (it resumes where it stopped).", ""]
    text += [
        "## How this page was made",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- grid: `{_rel(grid.path)}` (below), data seeds {grid.seeds}; runs in `{_rel(grid.out)}/<cell>-s<seed>`",
        f"- raw numbers: [`results/{grid.name}.csv`](results/{grid.name}.csv) (one row per cell, seed and evaluated policy)",
        *([f"- reused rows: {len(reused_runs)} runs ({', '.join(sorted({c for c, _ in reused_runs}))}) come from the "
           "earlier raw CSV the command names (`--reuse-csv`): their run directories are not on this machine and "
           "were not rerun; their figures are those of the commit that wrote that CSV"] if reused_runs else []),
        f"- machine: {machine()}",
        f"- run time summed over runs: {total_s / 3600:.2f} h ({finished} of {expected} runs finished" + (f"; unfinished: {', '.join(not_done)}" if not_done else "")
        + f"); wall clock while at least one run was going: {busy_wall_seconds(grid) / 3600:.2f} h "
        "(runs overlap with `--jobs 2`; a resumed run counts its last attempt only)",
        f"- commit `{_git_commit()}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "## Results",
        "",
        "Mean ± sd over data seeds at each cell's last evaluated policy. Win rates: gold judge, the",
        "policy's samples against pi_init's own on held-out prompts (ties half; 0.5 = no change);",
        "LC: length-controlled. Label columns (last iteration): share of labels agreeing with the gold",
        "judge before refinement, the same after Eq. 10's soft labels, and the share of flagged pairs",
        "that were really mislabelled.",
        "",
        markdown_table(summary),
        "",
        "## What holds against the paper",
        "",
        "Paired by data seed; 'holds' = the mean difference has the paper's sign and exceeds twice its",
        "standard error over seeds.",
        "",
        claims_table(verdicts) if verdicts else "(no claims listed in the grid file)",
        "",
    ]
    if any(c.table == "#21" for c in grid.cells):
        text += [
            "## Self-labels that can be trusted (issue #21)",
            "",
            "The selection cells beside SPA and the seed DPO, per iteration: gold win rate, the self-labelled",
            "pairs each iteration trained on (after the confidence filter; replayed seed pairs not counted)",
            "and their agreement with gold (pairs gold ties left out). Their claims are the `#21` rows above.",
            "",
            selection_table(done_rows, grid),
            "",
        ]
    if any(is_variant_row(r) for r in rows):
        text += [
            "## What the variants did",
            "",
            "Per training stage of each variant cell (finished runs): `prep_*` from the stage's",
            "preparation (`checkpoints/pi_t/variant.json`: SP2DPO's per-pair beta, SSPO's unpaired pool",
            "and g_min, S-SPPO's response similarity and gated pairs), the rest averaged over the stage's",
            "steps (`train_log.jsonl`: SSPO's threshold delta, g_t and share of unpaired responses",
            "labelled winning; S-SPPO's gate and repulsion; WDRO's pair weights and pairs moved per batch).",
            "",
            variant_table(variant_diagnostics(done_rows)),
            "",
        ]
    notes = grid.raw.get("notes")
    if notes:  # the hand-written reading of the numbers, kept outside this generated page
        text += [(REPO / notes).read_text(encoding="utf-8").rstrip(), ""]
    text += ["## Plots", ""]
    captions = {
        "label_quality.png": "Headline: label quality per iteration (left: every judge's agreement with gold; "
        "right: SPA's labels before and after self-refinement, and whether the flags find the wrong labels).",
        "win_rate_curves.png": "Gold win rate over pi_init per iteration (paper's Fig. 3), mean ± sd band over seeds.",
        "lc_win_rate_curves.png": "Length-controlled win rate per iteration.",
        "gain_vs_agreement.png": "Why an iteration helps or not: each point is one iteration of one run (cell, data "
        "seed), its labels' agreement with gold against the win-rate change it made.",
        "agreement_vs_kept.png": "The confidence filter: of an iteration's judged pairs, the top fraction by "
        "|implicit-reward margin|, and how many of those agree with gold (mean ± sd over the runs that wrote "
        "judged.parquet, per pair rule and iteration).",
    }
    order = sorted(images, key=lambda p: 0 if p.name.endswith("label_quality.png") else 1)
    for p in order:
        key = next((k for k in captions if p.name.endswith(k)), "")
        text += [f"![{key}](results/{p.name})", "", captions.get(key, ""), ""]
        if key == "gain_vs_agreement.png":
            text += [gain_fit_sentence(iteration_gains(done_rows)), ""]
    text += ["## The grid", "", "```yaml", yaml.safe_dump(grid.raw, sort_keys=False).rstrip(), "```", ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(text), encoding="utf-8")


# --------------------------------------------------------------------------- main
def page_command(args: argparse.Namespace) -> str:
    """The one command that makes the whole page: this call without its filters (--cells,
    --seeds) and without --report-only / --dry-run. Rerunning it skips finished runs and
    resumes unfinished ones, so it is also the command that completes a partial grid."""
    parts = ["benchmarks/reproduce.py", "--grid", args.grid]
    if args.root:
        parts += ["--root", args.root]
    for override in args.overrides:
        parts += ["--set", override]
    if args.in_process:
        parts.append("--in-process")
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    if args.no_share:
        parts.append("--no-share")
    if args.reuse_csv:
        parts += ["--reuse-csv", args.reuse_csv]
    if args.docs:
        parts += ["--docs", args.docs]
    return "nice -n 10 .venv/bin/python " + shlex.join(parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", required=True, help="grid YAML (benchmarks/grids/)")
    ap.add_argument("--root", default=None, help="folder of grid outputs (default: the grid's root, else runs/reproduce)")
    ap.add_argument("--cells", nargs="*", default=None, help="only these cells")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="only these data seeds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra base override key=value")
    ap.add_argument("--in-process", action="store_true", help="run_spa in this process instead of a subprocess per run")
    ap.add_argument("--report-only", action="store_true", help="collect and report what exists; run nothing")
    ap.add_argument("--docs", default=None, help="also write this markdown page (e.g. docs/results.md)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and their overrides, validate configs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own local Ray cluster)")
    ap.add_argument("--reuse-csv", default=None,
                    help="an earlier report's raw CSV (e.g. docs/results/reproduce.csv): rows of runs not on this "
                    "machine are taken from it instead of being rerun; the page says which")
    ap.add_argument("--no-share", action="store_true",
                    help="every run makes its own pi_0 instead of copying it from a donor cell (run.start_from)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    grid = load_grid(args.grid, args.root, args.overrides)
    cells = grid.cells if not args.cells else [c for c in grid.cells if c.name in set(args.cells)]
    missing = set(args.cells or []) - {c.name for c in cells}
    if missing:
        raise SystemExit(f"unknown cells {sorted(missing)}; the grid has {[c.name for c in grid.cells]}")
    seeds = args.seeds if args.seeds else grid.seeds
    if args.dry_run:
        for seed in seeds:
            donors = seed_stage_donors(grid, seed) if not args.no_share else {}
            for cell in cells:
                resolved_config(grid, cell, seed)
                done = "finished" if is_finished(grid, cell, seed) else "to run"
                donor = f"[pi_0 from {donors[cell.name]}] " if donors.get(cell.name) else ""
                print(f"{run_name(cell, seed):28s} {done:9s} {donor}{' '.join(cell.overrides)}")
        return 0
    started = time.time()
    if not args.report_only:
        if args.reuse_csv and not args.cells:  # runs the CSV holds and this machine lacks are not rerun
            held = {(r["cell"], int(r["seed"])) for r in read_csv(Path(args.reuse_csv))}
            cells = [c for c in cells if not all((c.name, s) in held and not (grid.out / run_name(c, s)).exists()
                                                 for s in seeds)]
        run_grid(grid, cells, seeds, args.in_process, jobs=args.jobs, share=not args.no_share)
    invoked = "nice -n 10 .venv/bin/python " + shlex.join(["benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    command = page_command(args)
    if invoked != command:
        command += f"\n# this page was written by: {invoked}"
    rows = collect(grid, Path(args.reuse_csv) if args.reuse_csv else None)
    report(grid, rows, command, Path(args.docs) if args.docs else None)
    print(f"reproduce: {len(rows)} rows from {len({(r['cell'], r['seed']) for r in rows})} runs; "
          f"this call took {time.time() - started:.0f}s")
    failed = [f"{c.name}-s{s}" for s in seeds for c in cells
              if (read_status(grid, run_name(c, s)) or {}).get("status") == "failed"]
    if failed:
        print(f"reproduce: failed runs (logs in {grid.out / '_logs'}): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
