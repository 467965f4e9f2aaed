"""The label audit stops a loop whose self-labels collapse, where the old health check did not.

The regime the README records: the embedded default model at training.learning_rate=1e-4.
Its pi_0's implicit reward still orders held-out *seed* pairs well (the health check reads
~0.8), but on its own samples it disagrees with gold more often than it agrees. The real
driver (``run_spa``) on a local Ray cluster with the embedded default model (built on first
use, ~5 min, then cached) must stop at iteration 1, before pi_1 is trained, exit code 3.
"""

import json

import pytest

from spa_ray.pipeline.config import load_config
from spa_ray.pipeline.driver import run_spa
from spa_ray.pipeline.run_dir import RunDirectory


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_audit_stops_the_lr_1e4_collapse_at_iteration_1(tmp_path, capsys):
    config = load_config(None, [
        f"run.root={tmp_path}", "run.name=collapse", "run.iterations=2", "training.learning_rate=1e-4",
        "evaluation.num_prompts=50",  # iteration 1 at its default size: 1000 prompts, 200 audited
    ])
    assert config.audit.pairs > 0 and config.audit.auditor == "gold"  # the default stop rule
    assert run_spa(config) == 3
    run = RunDirectory(str(tmp_path), "collapse")
    metrics = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    audit = [m for m in metrics if m.get("stage") == "audit_1"][-1]
    health = [m for m in metrics if m.get("stage") == "health_1"][-1]
    # the off-policy health check would have let it through; the on-policy audit does not
    assert health["judge_health"] >= 0.7
    assert not audit["passed"] and audit["ci_high"] < config.audit.floor, audit
    assert run.is_done("judge_1") and not run.is_done("audit_1") and not run.is_done("train_1")
    assert not (run.path / "checkpoints" / "pi_1").exists()
    assert "stopping before pi_1 is trained" in capsys.readouterr().err
    # rerunning the same command resumes to the same stop, without redoing judge_1
    assert run_spa(config) == 3
    again = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [m for m in again if m.get("stage") == "audit_1"][-1]["agreement"] == audit["agreement"]
    assert sum(m.get("stage") == "judge_1" for m in again) == 1
