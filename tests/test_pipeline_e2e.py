"""SPA end to end on a real local Ray cluster: the driver, actors, Ray Train, run directory.

A small config on the embedded task with its tiny (seconds-scale) model build: the same
code path as the default run, at toy sizes.
"""

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from spa_ray.pipeline.config import load_config
from spa_ray.pipeline.driver import run_spa

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spa_ray.tasks.embedded.build import TINY_BUILD, build_embedded_model

    cache = Path(os.environ.get("SPA_RAY_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    return str(build_embedded_model(cache_dir=cache, spec=TINY_BUILD, log=lambda m: None))


def small_overrides(root, model, name="small"):
    return [
        f"run.root={root}",
        f"run.name={name}",
        "run.iterations=2",
        f"model.name_or_path={model}",
        "model.max_prompt_len=48",
        "model.max_total_len=96",
        "data.task_kwargs={n_iterations: [40, 40], n_evaluation: 12}",
        "data.judge_holdout_fraction=0.05",
        "judge.health_floor=0.0", "audit.floor=0.0",
        # the paper's loop (every pair trained on): of 40 prompts the default 25% filter
        # would leave fewer pairs than one batch
        "judge.keep_fraction=1",
        "generation.max_new_tokens=24",
        "generation.batch_size=32",
        "training.global_batch_size=8",
        "training.micro_batch_size=4",
        "training.seed_epochs=1",
        "training.learning_rate=1e-3",
        "evaluation.num_prompts=12",
        "evaluation.samples_per_prompt=1",
    ]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_run_end_to_end(tmp_path, tiny_model):
    config = load_config(None, small_overrides(tmp_path, tiny_model))
    assert run_spa(config) == 0
    run = tmp_path / "small"
    ledger = json.loads((run / "stages.json").read_text())["finished"]
    expected = {"prepare", "eval_baseline", "eval_init", "train_0", "eval_pi_0"}
    for t in (1, 2):
        expected |= {f"health_{t}", f"gen_{t}", f"judge_{t}", f"audit_{t}", f"train_{t}", f"eval_pi_{t}"}
    assert expected <= set(ledger)

    gens = pq.read_table(run / "data/iter_1/generations/generations.parquet").to_pydict()
    assert len(gens["text"]) == 80  # 40 prompts x 2 samples
    pairs = pq.read_table(run / "data/iter_1/pairs/pairs.parquet").to_pydict()
    # every prompt: a trained pair, a tie, or a pair held out for the label audit (a quarter at most)
    assert len(pairs["chosen_ids"]) + ledger["judge_1"]["ties"] + ledger["judge_1"]["audit_pairs"] == 40
    assert 0 < ledger["judge_1"]["audit_pairs"] <= ledger["judge_1"]["judged_pairs"] // 4
    assert all(c >= 0.5 for c in pairs["probability"]) and set(pairs["source"]) == {"self"}
    judged = pq.read_table(run / "data/iter_1/pairs/judged.parquet").to_pydict()
    assert len(judged["kept"]) == 40 - ledger["judge_1"]["ties"] and all(judged["kept"])
    key = lambda t, i: (tuple(t["prompt_ids"][i]), tuple(t["chosen_ids"][i]), tuple(t["rejected_ids"][i]))  # noqa: E731
    audited = {key(judged, i) for i, a in enumerate(judged["audit"]) if a}
    trained = {key(pairs, i) for i in range(len(pairs["prompt_ids"]))}
    assert audited and not audited & trained, "audited pairs are never trained on"
    assert ledger["audit_1"]["audited"] == ledger["judge_1"]["audit_pairs"]
    # no filter here: the audited pairs the filter kept are all of them
    assert ledger["audit_1"]["kept_audited"] == ledger["audit_1"]["audited"]
    for t in (0, 1, 2):
        assert (run / f"checkpoints/pi_{t}/model.safetensors").exists()
    assert (run / "checkpoints/pi_1/noise_flags.parquet").exists()
    labelled = pq.read_table(run / "data/iter_1/labelled_pairs.parquet").to_pydict()
    assert labelled["chosen_ids"] == pairs["chosen_ids"]
    assert set(labelled["z"]) <= {0.0, 1.0, None} and any(z is not None for z in labelled["z"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("kind") == "train_step" and m["stage"] == "train_2" for m in metrics)
    assert (run / "plots/win_rate.png").stat().st_size > 0
    assert "seed DPO" in (run / "results.md").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["name"] == "small"

    # rerunning the finished run redoes nothing
    before = {p: _sha(p) for p in run.rglob("*.safetensors")}
    assert run_spa(config) == 0
    assert {p: _sha(p) for p in run.rglob("*.safetensors")} == before


def test_judge_on_the_trainers_ranks_runs_the_loop_without_judge_actors(tmp_path, tiny_model, capfd):
    """judge.on_trainer: the health check and judge_1 are labelled by the trainer group's
    rank(s) with pi_0 (from their memory) against pi_init; the labels equal a judge actor's."""
    from spa_ray.actors import JudgeActor
    from spa_ray.pipeline.self_labels import judge_rows

    overrides = small_overrides(tmp_path, tiny_model, name="on_trainer") + ["judge.on_trainer=true", "run.iterations=1"]
    config = load_config(None, overrides)
    assert run_spa(config) == 0
    out, err = capfd.readouterr()
    assert "judges.label" not in out + err and "generators.generate" in out + err  # no judge pool was made
    run = tmp_path / "on_trainer"
    ledger = json.loads((run / "stages.json").read_text())["finished"]
    assert {"health_1", "judge_1", "audit_1", "train_1", "eval_pi_1"} <= set(ledger)
    gen = pq.read_table(run / "data/iter_1/generations/generations.parquet").to_pydict()
    order, rows = judge_rows(gen, "first_two", False, where="test")
    actor = JudgeActor(str(run / "checkpoints/pi_0"), tiny_model, version=1, beta=config.judge.beta,
                       max_tokens_per_batch=config.judge.max_tokens_per_batch)
    expected = {tuple(r["prompt_ids"]): e for r, e in zip(rows, actor.label(rows))}
    judged = pq.read_table(run / "data/iter_1/pairs/judged.parquet").to_pydict()
    assert len(judged["prompt_ids"]) == 40 - ledger["judge_1"]["ties"]
    for i, prompt in enumerate(judged["prompt_ids"]):
        e = expected[tuple(prompt)]
        assert judged["reward_chosen"][i] == pytest.approx(max(e["reward_1"], e["reward_2"]), abs=1e-5)
        assert judged["reward_rejected"][i] == pytest.approx(min(e["reward_1"], e["reward_2"]), abs=1e-5)
