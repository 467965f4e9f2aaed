"""The run directory: atomic stages, a ledger that survives kills, no path escapes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from spa_ray.pipeline.run_dir import RunDirError, RunDirectory


def test_stage_is_recorded_only_when_complete(tmp_path):
    run = RunDirectory(tmp_path, "r1")
    with pytest.raises(RuntimeError):
        with run.stage_dir("gen_1", "data", "iter_1") as d:
            (d / "generations.parquet").write_text("half")
            raise RuntimeError("killed")
    assert not run.is_done("gen_1")
    assert not (run.path / "data" / "iter_1").exists()
    assert not list(run.path.rglob(".tmp-*"))

    with run.stage_dir("gen_1", "data", "iter_1", rows=3) as d:
        (d / "generations.parquet").write_text("whole")
    assert run.is_done("gen_1") and run.stage_info("gen_1")["rows"] == 3
    assert (run.path / "data" / "iter_1" / "generations.parquet").read_text() == "whole"
    with pytest.raises(RunDirError, match="already finished"):
        with run.stage_dir("gen_1", "data", "iter_1"):
            pass

    again = RunDirectory(tmp_path, "r1")  # a restart reads the ledger back
    assert again.finished_stages() == ["gen_1"]


def test_sigkill_mid_stage_leaves_no_finished_looking_output(tmp_path):
    code = textwrap.dedent(f"""
        import os, time
        from spa_ray.pipeline.run_dir import RunDirectory
        run = RunDirectory({str(tmp_path)!r}, "r")
        with run.stage_dir("seed", "data", "seed") as d:
            (d / "pairs.parquet").write_text("x")
        with run.stage_dir("train_0", "checkpoints", "pi_0") as d:
            (d / "model.safetensors").write_text("partial")
            print("inside", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDirectory(tmp_path, "r")
    assert run.finished_stages() == ["seed"]
    assert not (run.path / "checkpoints" / "pi_0").exists()
    assert not list(run.path.rglob(".tmp-*")), "temporaries of the killed stage are cleaned on restart"


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "..", "a b", ""])
def test_names_that_could_escape_are_refused(tmp_path, bad):
    run = RunDirectory(tmp_path, "r")
    with pytest.raises(RunDirError):
        run.subpath(bad)
    with pytest.raises(RunDirError):
        RunDirectory(tmp_path, bad)


def test_corrupt_ledger_is_named(tmp_path):
    run = RunDirectory(tmp_path, "r")
    run.mark_done("seed")
    (run.path / "stages.json").write_text("{not json")
    with pytest.raises(RunDirError, match="stages.json"):
        RunDirectory(tmp_path, "r")


def test_metrics_survive_a_cut_line(tmp_path):
    run = RunDirectory(tmp_path, "r")
    run.append_metrics({"stage": "train_1", "loss": 0.5})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "tra')  # a kill in the middle of a write
    assert [m["loss"] for m in run.read_metrics()] == [0.5]
    assert json.loads((run.path / "metrics.jsonl").read_text().splitlines()[0])["stage"] == "train_1"


def test_resume_accepts_a_config_saved_before_new_settings_existed(tmp_path):
    """A run started by an older version (its config.yaml lacks a section added since)
    resumes when it did not rely on the new settings; a real difference is still refused."""
    import yaml

    from spa_ray.pipeline.config import ConfigError, config_to_dict, load_config
    from spa_ray.pipeline.run_dir import RunDirectory
    from spa_ray.pipeline.stages import Run

    config = load_config(overrides=[f"run.root={tmp_path}", "run.name=old"])
    saved = config_to_dict(config)
    saved.pop("variant", None)
    saved["evaluation"].pop("alpaca_eval_json")
    directory = RunDirectory(tmp_path, "old")
    directory.write_text("config.yaml", yaml.safe_dump(saved, sort_keys=False))
    directory.mark_done("prepare")

    run = Run.__new__(Run)
    run.config, run.dir = config, directory
    run._check_config()  # accepted: the missing settings are at their defaults
    assert "variant" in yaml.safe_load((directory.path / "config.yaml").read_text())

    run.config = load_config(overrides=[f"run.root={tmp_path}", "run.name=old", "training.alpha=0.3"])
    with pytest.raises(ConfigError, match="training.alpha"):
        run._check_config()


def test_resume_may_change_resource_settings_and_logs_each_change(tmp_path):
    """After an OOM a user resumes with less memory or more offload: RESOURCE_SETTINGS may
    change (recorded in metrics.jsonl); the trainer's rank count and anything computed may not."""
    from spa_ray.pipeline.config import ConfigError, load_config
    from spa_ray.pipeline.run_dir import RunDirectory
    from spa_ray.pipeline.stages import Run

    base = [f"run.root={tmp_path}", "run.name=r"]
    directory = RunDirectory(tmp_path, "r")
    run = Run.__new__(Run)
    run.config, run.dir = load_config(overrides=base), directory
    run._check_config()
    directory.mark_done("prepare")

    changed = [*base, "generation.gpu_memory_utilization=0.4", "placement.judges.num_gpus=0.25",
               "training.deepspeed={zero_optimization: {reduce_bucket_size: 1000000}}"]
    run.config = load_config(overrides=changed)
    run._check_config()
    [record] = [r for r in directory.read_metrics() if r.get("kind") == "config_change"]
    assert record["changed"] == {
        "generation.gpu_memory_utilization": [0.85, 0.4],
        "placement.judges.num_gpus": [0.0, 0.25],
        "training.deepspeed.zero_optimization": [None, {"reduce_bucket_size": 1000000}],
    }
    assert record["finished_stages"] == ["prepare"]
    run._check_config()  # the same config again: nothing new to record
    assert len([r for r in directory.read_metrics() if r.get("kind") == "config_change"]) == 1

    for refused in ("placement.trainer.count=2", "generation.batch_size=8", "training.zero_stage=3"):
        run.config = load_config(overrides=[*changed, refused])
        with pytest.raises(ConfigError, match=refused.split("=")[0].replace(".", r"\.")):
            run._check_config()
