"""Peak memory of a whole SPA job (driver, Ray's own processes, actors, trainer workers), per iteration.

Runs ``python jobs/spa_run.py`` (from ``--repo``, so another checkout can be measured with
the same script) as a child with its own local Ray cluster, and samples every process
under it twice a second:

- PSS (proportional set size: shared pages -- the object store, shared libraries -- split
  among the processes that map them, so the sum is the job's real footprint),
- RSS summed over processes (counts shared pages once per process: an upper bound).

Each sample is charged to the stage running at that moment (the first not yet in the
run's ledger); the table gives the peak per iteration (iteration t = health_t .. eval_pi_t;
"setup" is everything before health_1) so growth with the iteration count shows.

    python benchmarks/bench_memory.py --iterations 3 --prompts 300
    python benchmarks/bench_memory.py --repo /path/to/old/checkout --name before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tree(root_pid: int):
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sample(root_pid: int) -> tuple[int, int, int]:
    """(PSS sum, RSS sum, process count) over the job's process tree."""
    import psutil

    pss = rss = n = 0
    for p in _tree(root_pid):
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        n += 1
    return pss, rss, n


def _stage_order(iterations: int) -> list[str]:
    order = ["prepare", "eval_baseline", "eval_init", "train_0", "eval_pi_0"]
    for t in range(1, iterations + 1):
        order += [f"health_{t}", f"gen_{t}", f"judge_{t}", f"train_{t}", f"eval_pi_{t}"]
    return order


def _running_stage(ledger: Path, order: list[str]) -> str:
    try:
        done = set(json.loads(ledger.read_text()).get("finished", {}))
    except (OSError, ValueError):
        done = set()
    return next((s for s in order if s not in done), "end")


def _iteration_of(stage: str) -> str:
    tail = stage.rsplit("_", 1)[-1]
    if stage.startswith(("health_", "gen_", "judge_", "train_", "eval_pi_")) and tail.isdigit() and int(tail) >= 1:
        return f"iteration {tail}"
    return "end" if stage == "end" else "setup"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose jobs/spa_run.py runs")
    ap.add_argument("--name", default="current", help="a label for this measurement (the CSV row)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=300, help="prompts per iteration (X_t)")
    ap.add_argument("--root", type=Path, default=None, help="run root (default runs/bench/memory)")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    root = (args.root or bc.DEFAULT_OUT / "memory").resolve()
    name = f"mem_{args.name}"
    sizes = ", ".join([str(args.prompts)] * args.iterations)
    cmd = [sys.executable, str(args.repo / "jobs" / "spa_run.py"), f"run.root={root}", f"run.name={name}",
           f"run.iterations={args.iterations}", f"data.task_kwargs={{n_iterations: [{sizes}]}}"]
    run_dir = root / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    order = _stage_order(args.iterations)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    bc.log(" ".join(cmd))
    started = time.time()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"{name}.log", "w")
    child = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[str, dict[str, float]] = {}
    while child.poll() is None:
        pss, rss, n = _sample(child.pid)
        stage = _running_stage(run_dir / "stages.json", order)
        key = _iteration_of(stage)
        p = peaks.setdefault(key, {"pss": 0, "rss": 0, "processes": 0, "stage_at_peak": ""})
        if pss > p["pss"]:
            p.update(pss=pss, stage_at_peak=stage, processes=n)
        p["rss"] = max(p["rss"], rss)
        time.sleep(args.interval)
    if child.returncode != 0:
        raise SystemExit(f"the job exited with {child.returncode}; see {log.name}")
    info = bc.header("memory", 1, "cpu", {"repo": str(args.repo), "iterations": args.iterations,
                                          "prompts_per_iteration": args.prompts,
                                          "job_seconds": round(time.time() - started, 1)})
    rows = [{"measurement": args.name, "phase": k, "peak_pss_gib": v["pss"] / 2**30, "peak_rss_sum_gib": v["rss"] / 2**30,
             "processes_at_peak": v["processes"], "stage_at_peak": v["stage_at_peak"]}
            for k, v in peaks.items() if k != "end"]
    cols = ["measurement", "phase", "peak_pss_gib", "peak_rss_sum_gib", "processes_at_peak", "stage_at_peak"]
    bc.print_table("Peak memory of the job's processes, by iteration", info, rows, cols)
    bc.write_csv(args.out or bc.DEFAULT_OUT / f"memory_{args.name}.csv", info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
