"""A driver killed mid-run resumes after its last finished stage and ends where an
uninterrupted run ends (same pairs, same checkpoint bytes)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spa_ray.pipeline.config import load_config
from spa_ray.pipeline.driver import run_spa
from test_pipeline_e2e import small_overrides, tiny_model  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _ledger(run: Path) -> dict:
    path = run / "stages.json"
    return json.loads(path.read_text())["finished"] if path.exists() else {}


def _spa_run(overrides, env=None):
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "spa_run.py"), *overrides],
        cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _final_state(run: Path) -> dict:
    out = {}
    for t in (1, 2):
        out[f"pairs_{t}"] = pq.read_table(run / f"data/iter_{t}/pairs/pairs.parquet").to_pydict()
    for t in (0, 1, 2):
        out[f"pi_{t}"] = hashlib.sha256((run / f"checkpoints/pi_{t}/model.safetensors").read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["gen_1"])
def test_killed_driver_resumes_to_the_same_result(tmp_path, tiny_model, kill_after):
    reference = load_config(None, small_overrides(tmp_path / "a", tiny_model, name="r"))
    assert run_spa(reference) == 0

    overrides = small_overrides(tmp_path / "b", tiny_model, name="r")
    run = tmp_path / "b" / "r"
    proc = _spa_run(overrides)
    deadline = time.time() + 600
    while kill_after not in _ledger(run):
        assert proc.poll() is None, "the driver ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _ledger(run)
    assert "train_2" not in before

    resumed = _spa_run(overrides)
    assert resumed.wait(timeout=900) == 0
    after = _ledger(run)
    for stage, info in before.items():  # finished stages were not redone
        assert after[stage]["finished_at"] == info["finished_at"], stage
    assert _final_state(run) == _final_state(tmp_path / "a" / "r")
