"""Reliability: the driver SIGKILLed at random points across stages, several trials.

Each trial starts the job (``jobs/spa_run.py``, a real local Ray cluster in its own
process group; the e2e test's tiny config with one SPA iteration), kills the whole group with SIGKILL at a random, seeded time, reruns the
same command, and checks that the run completes, that every stage finished before the
kill is not redone (its ledger entry is untouched), and that the final pairs and
checkpoint bytes equal those of an uninterrupted run with the same seed.

Kill times are stratified: trial i draws its time uniformly from the i-th of
``SPA_KILL_TRIALS`` equal slices of [5%, 85%] of the uninterrupted run's wall time, so
the trials land early, in the middle and late in the run. Which stage each kill
interrupted is recorded (printed, and written to ``$SPA_RELIABILITY_RECORD`` if set).
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_pipeline_e2e import small_overrides, tiny_model  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("SPA_KILL_TRIALS", "3"))
KILL_SEED = int(os.environ.get("SPA_KILL_SEED", "6"))
STAGE_ORDER = ["prepare", "eval_baseline", "eval_init", "train_0", "eval_pi_0",
               "health_1", "gen_1", "judge_1", "audit_1", "train_1", "eval_pi_1"]
# A Ray head that cannot start on an overloaded machine is not what this test is about:
# such a start is retried (and counted), any other failure fails the test.
RAY_STARTUP_FAILURE = "timed out during startup"


_ADDRESS: list = []  # set by the `cluster` fixture when the drivers join a running cluster


def _overrides(root, model):
    """The e2e test's small config, one iteration, a 69-pair seed set: every stage kind, short."""
    return small_overrides(root, model, name="r") + [
        "run.iterations=1", "data.task_kwargs={n_iterations: [40], n_evaluation: 12, seed_fraction: 0.002}",
        *([f"placement.ray_address={_ADDRESS[0]}"] if _ADDRESS else []),
    ]


@pytest.fixture(params=["own_cluster", "joined_cluster"])
def mode(request):
    """own_cluster: each driver starts a local Ray (ray.init) and the kill takes the whole
    cluster down with it. joined_cluster: the drivers join a Ray cluster that outlives
    them (as under `ray job submit`); the kill takes only the driver, Ray reaps its actors."""
    if request.param == "own_cluster":
        yield request.param
        return
    # The test process starts the cluster as `ray_local` does (ray.init, retried when an
    # overloaded machine misses Ray's start window) and the drivers join it by address.
    request.getfixturevalue("ray_local")
    import ray

    _ADDRESS.append(ray.get_runtime_context().gcs_address)
    try:
        yield request.param
    finally:
        _ADDRESS.clear()


def _ledger(run: Path) -> dict:
    path = run / "stages.json"
    return json.loads(path.read_text())["finished"] if path.exists() else {}


def _start(overrides, log: Path):
    handle = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "spa_run.py"), *overrides],
        cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _startup_failed(log: Path, offset: int) -> bool:
    with open(log, "rb") as f:
        f.seek(offset)
        return RAY_STARTUP_FAILURE in f.read().decode("utf-8", "replace")


def _run_to_end(overrides, log: Path, retries: list) -> int:
    for _ in range(4):
        offset = log.stat().st_size if log.exists() else 0
        rc = _start(overrides, log).wait(timeout=2400)
        if rc == 0 or not _startup_failed(log, offset):
            return rc
        retries.append("ray startup")
    return rc


def _final_state(run: Path) -> dict:
    out = {"pairs_1": pq.read_table(run / "data/iter_1/pairs/pairs.parquet").to_pydict()}
    for t in (0, 1):
        out[f"pi_{t}"] = hashlib.sha256((run / f"checkpoints/pi_{t}/model.safetensors").read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_driver_sigkilled_at_random_points_resumes_to_the_same_result(tmp_path, tiny_model, mode):
    retries: list = []
    started = time.monotonic()
    rc = _run_to_end(_overrides(tmp_path / "ref", tiny_model), tmp_path / "ref.log", retries)
    assert rc == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference_s = time.monotonic() - started
    expected = _final_state(tmp_path / "ref" / "r")
    assert set(_ledger(tmp_path / "ref" / "r")) == set(STAGE_ORDER)

    rng = random.Random(KILL_SEED)
    lo, hi = 0.05, 0.85
    records = []
    for trial in range(TRIALS):
        a = lo + (hi - lo) * trial / TRIALS
        kill_at = rng.uniform(a, a + (hi - lo) / TRIALS) * reference_s
        overrides = _overrides(tmp_path / f"trial{trial}", tiny_model)
        run = tmp_path / f"trial{trial}" / "r"
        log = tmp_path / f"trial{trial}.log"
        for _attempt in range(3):  # the kill must interrupt a stage; a machine that got faster than
            shutil.rmtree(tmp_path / f"trial{trial}", ignore_errors=True)  # during the reference is killed earlier
            offset = log.stat().st_size if log.exists() else 0
            proc = _start(overrides, log)
            t0 = time.monotonic()
            while time.monotonic() - t0 < kill_at:
                if proc.poll() is not None and proc.returncode != 0 and _startup_failed(log, offset):
                    retries.append("ray startup")
                    offset = log.stat().st_size
                    proc, t0 = _start(overrides, log), time.monotonic()
                assert proc.poll() is None, f"trial {trial}: the driver ended before the kill at {kill_at:.1f}s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            before = _ledger(run)
            interrupted = next((s for s in STAGE_ORDER if s not in before), None)
            if interrupted is not None:
                break
            retries.append("every stage finished before the kill: killing earlier")
            kill_at /= 2
        assert interrupted is not None, f"trial {trial}: every stage had finished before the kill"

        t1 = time.monotonic()
        rc = _run_to_end(overrides, log, retries)
        record = {
            "trial": trial, "kill_at_s": round(kill_at, 1), "stages_finished_before_kill": len(before),
            "killed_during": interrupted, "resume_rc": rc, "resume_s": round(time.monotonic() - t1, 1),
        }
        records.append(record)
        record["mode"] = mode
        print(f"spa-ray reliability: {json.dumps(record)}", flush=True)
        assert rc == 0, log.read_text()[-3000:]
        after = _ledger(run)
        assert set(after) == set(STAGE_ORDER)
        redone = [s for s, info in before.items() if after[s]["finished_at"] != info["finished_at"]]
        assert redone == [], f"trial {trial}: finished stages were redone: {redone}"
        state = _final_state(run)
        record["same_result"] = state == expected
        assert state == expected, f"trial {trial}: the resumed run differs from the uninterrupted one"

    summary = {"mode": mode, "kill_seed": KILL_SEED, "reference_s": round(reference_s, 1), "trials": records,
               "ray_startup_retries": len(retries)}
    print(f"spa-ray reliability summary: {json.dumps(summary)}", flush=True)
    if os.environ.get("SPA_RELIABILITY_RECORD"):
        with open(os.environ["SPA_RELIABILITY_RECORD"], "a") as f:
            f.write(json.dumps(summary) + "\n")
    assert len({r["killed_during"] for r in records}) >= min(2, TRIALS), "the kills did not spread over stages"
