"""The job end to end with vLLM generators: `python jobs/spa_run.py generation.backend=vllm`.

The embedded default (its task, its tiny model, two SPA iterations, local Ray, DeepSpeed
over gloo), with the generators on vLLM's CPU backend, run as a user runs it: the job
script in a subprocess. Then the same run with judge.reuse_generator_logprobs=true, which
copies the first run's stages up to pi_0 (run.start_from), labels with vLLM's own log pi
and moves weights to the generators by the collective route over gloo. Both tables are printed with their label agreement; SPA_RAY_REPORT (a path), when
set, receives them as JSON for docs/performance.md.

Slow (several minutes each); part of CI's vLLM step.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (build .venv-vllm, README)")

from spa_ray.pipeline.run_dir import RunDirectory  # noqa: E402
from spa_ray.pipeline.stages import run_results  # noqa: E402

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]


def _job(*overrides: str, timeout: int = 1500) -> str:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "jobs/spa_run.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _table(root: Path, name: str) -> list[dict]:
    return run_results(RunDirectory(root, name), iterations=2)


def test_embedded_default_with_vllm_generators(tmp_path):
    base = ["generation.backend=vllm", f"run.root={tmp_path}"]
    out = _job(*base, "run.name=vllm")
    assert "| stage | gold win rate |" in out and "SPA iteration 2 (pi_2)" in out
    paper = _table(tmp_path, "vllm")

    # the second run also moves weights by the collective route (gloo, NCCL's CPU twin)
    reuse = ["judge.reuse_generator_logprobs=true", f"run.start_from={tmp_path / 'vllm'}", "weight_sync.method=gloo"]
    out = _job(*base, "run.name=vllm-reuse", *reuse)
    assert "SPA iteration 2 (pi_2)" in out
    assert "via gloo" in out and not re.search(r"MB, [1-9][0-9]* fallbacks", out)
    reused = _table(tmp_path, "vllm-reuse")
    # the second run judged with vLLM's own log pi: its generations carry them
    gens = pq.read_table(tmp_path / "vllm-reuse" / "data" / "iter_1" / "generations" / "generations.parquet")
    assert "policy_logp" in gens.column_names

    report = {}
    for label, rows in (("judge forward (default)", paper), ("reuse_generator_logprobs=true", reused)):
        report[label] = [{k: r.get(k) for k in ("stage", "win_rate", "lc_win_rate", "label_agreement")} for r in rows]
        print(f"\n{label}:")
        for r in report[label]:
            print(f"  {r['stage']}: win {r['win_rate']:.3f}, label agreement {r.get('label_agreement')}")
    if os.environ.get("SPA_RAY_REPORT"):
        Path(os.environ["SPA_RAY_REPORT"]).write_text(json.dumps(report, indent=1))
    for rows in (paper, reused):
        agreements = [r["label_agreement"] for r in rows if r.get("label_agreement") is not None]
        assert len(agreements) == 2 and all(0.5 < a <= 1.0 for a in agreements), agreements
