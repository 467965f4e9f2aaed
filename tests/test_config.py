"""The config tree: defaults, YAML, CLI overrides, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spa_ray.pipeline.config import SPAConfig, load_config, config_to_dict
from spa_ray.config.tree import ConfigError, describe

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_where_the_paper_fixes_them():
    c = SPAConfig()
    assert (c.training.beta, c.training.alpha, c.training.k_percent) == (0.1, 0.1, 10.0)
    assert (c.training.confidence_window, c.training.denoise_warmup, c.training.lambda_first) == (50, 0.2, 0.5)
    assert (c.generation.responses_per_prompt, c.generation.temperature, c.generation.max_new_tokens) == (2, 0.7, 300)
    assert c.training.global_batch_size == 32 and c.training.seed_epochs == 3 and c.training.iteration_epochs == 1
    assert c.judge.reference == "init" and c.model.trust_remote_code is False


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": "x", "iterations": 3}, "training": {"alpha": 0.2}}))
    c = load_config(p, ["training.alpha=0.3", "placement.generators.count=2", "placement.judges.resources={pool: 1}"])
    assert c.run.name == "x" and c.run.iterations == 3
    assert c.training.alpha == 0.3
    assert c.placement.generators.count == 2
    assert c.placement.judges.resources == {"pool": 1}
    # round trip through the plain form written to the run directory
    again = load_config(None, [f"run.name={c.run.name}"])
    assert again.run.name == "x"
    p2 = tmp_path / "resolved.yaml"
    p2.write_text(yaml.safe_dump(config_to_dict(c)))
    assert load_config(p2) == c


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training.alhpa=0.1", "training.alhpa"),
        ("training.alpha=1.5", "training.alpha"),
        ("training.k_percent=100", "training.k_percent"),
        ("training.k_percent=0", "training.k_percent"),
        ("training.zero_stage=4", "training.zero_stage"),
        ("judge.reference=sft", "judge.reference"),
        ("run.name=../escape", "run.name"),
        ("run.iterations=two", "run.iterations"),
        ("generation.responses_per_prompt=1", "generation.responses_per_prompt"),
        ("placement.trainer.count=0", "count"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    rows = describe(SPAConfig)
    assert len(rows) > 40
    undocumented = [key for key, _, help_text in rows if not help_text]
    assert undocumented == []


def test_presets_load():
    presets = sorted((REPO / "clusters" / "presets").glob("*.yaml"))
    assert presets, "clusters/presets/ holds the paper's setup"
    for preset in presets:
        load_config(preset)


def test_cli_reports_config_errors_with_exit_2():
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "spa_run.py"), "training.alpha=7"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert r.returncode == 2
    assert "training.alpha" in r.stderr


def test_readme_config_reference_is_current():
    sys.path.insert(0, str(REPO / "tools"))
    from sync_readme import render

    readme = (REPO / "README.md").read_text()
    assert render(readme) == readme, "run: python tools/sync_readme.py"


def test_a_partly_given_section_keeps_its_factorys_other_values():
    """placement.judges defaults to 0.5 CPU (a shared core), not ActorGroup's 1.0: setting only its
    GPUs must not silently change its CPUs to 1.0 (before this fix it did)."""
    config = load_config(overrides=["placement.judges.num_gpus=0.25"])
    assert (config.placement.judges.num_cpus, config.placement.judges.num_gpus) == (0.5, 0.25)
    assert config.placement.generators.num_cpus == 0.5 and config.placement.trainer.num_cpus == 1.0
    config = load_config(overrides=["data.task_kwargs={seed_fraction: 0.1}"])  # a plain dict is taken whole
    assert config.data.task_kwargs == {"seed_fraction": 0.1}
    with pytest.raises(ConfigError, match=r"unknown key placement\.judges\.bogus"):
        load_config(overrides=["placement.judges.bogus=1"])
