"""run.start_from: a run that copies another run's stages up to pi_0 ends exactly where the
same run made from scratch ends, and copying is refused when a seed-stage setting differs."""

import hashlib
import json
from pathlib import Path

import pytest

from spa_ray.pipeline.config import ConfigError, config_to_dict, load_config
from spa_ray.pipeline.driver import run_spa
from spa_ray.pipeline.start_from import SEED_STAGES, seed_stage_differences
from test_pipeline_e2e import small_overrides, tiny_model  # noqa: F401  (fixture)


def _ledger(run: Path) -> dict:
    return json.loads((run / "stages.json").read_text())["finished"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_iteration_settings_may_differ():
    base = config_to_dict(load_config(None, []))
    iteration_only = config_to_dict(load_config(None, [
        "run.name=other", "run.iterations=5", "judge.kind=reward_model", "judge.reference=previous",
        "judge.length_penalty=0.01", "training.self_refine=false", "training.decoupled_noise_detection=false",
        "training.alpha=0.3", "training.k_percent=20", "training.iteration_epochs=2",
        "weight_sync.method=gloo", "weight_sync.timeout_s=60",  # transport: checksums verified, results equal
    ]))
    assert seed_stage_differences(base, iteration_only) == []
    seed_stage = config_to_dict(load_config(None, [
        "training.seed_epochs=1", "training.learning_rate=3e-5", "run.seed=3", "evaluation.num_prompts=50",
        "generation.temperature=1.0", "placement.trainer.num_cpus=2",
    ]))
    assert seed_stage_differences(base, seed_stage) == [
        "evaluation.num_prompts", "generation.temperature", "placement.trainer.num_cpus", "run.seed",
        "training.learning_rate", "training.seed_epochs",
    ]


@pytest.fixture(scope="module")
def donor(ray_local, tmp_path_factory, tiny_model):
    """A finished seed-DPO run (run.iterations=0): prepare, both evaluations, pi_0."""
    root = tmp_path_factory.mktemp("donor")
    assert run_spa(load_config(None, small_overrides(root, tiny_model, name="donor") + ["run.iterations=0"])) == 0
    return root / "donor"


def test_copied_seed_stages_end_where_a_run_from_scratch_ends(donor, tmp_path, tiny_model):
    ablation = ["run.iterations=1", "training.self_refine=false", "judge.reference=none"]
    copied = load_config(None, small_overrides(tmp_path, tiny_model, name="copied") + ablation
                         + [f"run.start_from={donor}"])
    assert run_spa(copied) == 0
    scratch = load_config(None, small_overrides(tmp_path, tiny_model, name="scratch") + ablation)
    assert run_spa(scratch) == 0

    run, ref = tmp_path / "copied", tmp_path / "scratch"
    ledger = _ledger(run)
    for stage in SEED_STAGES:
        assert ledger[stage]["copied_from"] == str(donor), stage
    assert "copied_from" not in ledger["train_1"]
    assert _sha(run / "checkpoints/pi_0/model.safetensors") == _sha(donor / "checkpoints/pi_0/model.safetensors")
    # the iteration that ran on copied stages is the iteration a run from scratch makes
    assert _sha(run / "checkpoints/pi_1/model.safetensors") == _sha(ref / "checkpoints/pi_1/model.safetensors")
    assert json.loads((run / "eval/pi_1/summary.json").read_text()) == json.loads((ref / "eval/pi_1/summary.json").read_text())
    copied_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in copied_lines if "copied_from" in r} == set(SEED_STAGES) - {"eval_baseline"}

    # resuming the finished copy (same command) redoes nothing
    before = _ledger(run)
    assert run_spa(copied) == 0
    assert _ledger(run) == before


def test_start_from_refuses_other_seed_settings_and_non_runs(donor, tmp_path, tiny_model):
    other = load_config(None, small_overrides(tmp_path, tiny_model, name="other") + [
        "training.seed_epochs=2", f"run.start_from={donor}"])
    with pytest.raises(ConfigError, match=r"donor was made with other settings .*training\.seed_epochs"):
        run_spa(other)
    assert not (tmp_path / "other" / "checkpoints").exists()  # nothing copied

    (tmp_path / "empty").mkdir()
    nowhere = load_config(None, small_overrides(tmp_path, tiny_model, name="nowhere") + [
        f"run.start_from={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"empty is not a run directory"):
        run_spa(nowhere)
