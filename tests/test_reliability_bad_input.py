"""Reliability: bad input to a whole run gives one clear error naming its source, and
leaves nothing half-written in the run directory.

Each case starts the real driver (``run_spa``) on a real local Ray cluster with the
UltraFeedback task over a (broken) local JSONL file and a tiny model folder built here.
The data layer's own row-level checks are in test_data_loading.py; this file checks that
they reach the user through a run, and adds what only a run can get wrong: the model
folder, config values, placements the cluster cannot hold.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny_model import save_tiny_model_dir
from spa_ray.data.errors import DataError
from spa_ray.models.loading import MissingChatTemplateError, MissingTokenizerError, ModelLoadError
from spa_ray.pipeline.config import load_config
from spa_ray.config.tree import ConfigError
from spa_ray.pipeline.driver import run_spa
from spa_ray.pipeline.stages import Run, prepare_data
from spa_ray.tasks.base import PromptSplits
from spa_ray.tasks.ultrafeedback import UltraFeedbackTask

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "ultrafeedback_tiny.jsonl"


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def overrides(root: Path, model, dataset, task="spa_ray.tasks.ultrafeedback:UltraFeedbackTask", extra=()):
    return [
        f"run.root={root}", "run.name=bad", f"model.name_or_path={model}", f"data.task={task}",
        f"data.task_kwargs={{dataset: '{dataset}', seed_fraction: 0.3, iteration_fractions: [0.2, 0.2], "
        "holdout_fraction: 0.1}",
        "model.max_prompt_len=48", "model.max_total_len=96", "audit.pairs=0", *extra,  # no gold judge to audit with
    ]


def assert_nothing_half_written(run: Path) -> None:
    """No stage recorded, no stage output, no temporary left behind."""
    ledger = run / "stages.json"
    finished = json.loads(ledger.read_text())["finished"] if ledger.exists() else {}
    assert finished == {}, finished
    for part in ("data", "checkpoints", "eval", "health", "ray_train"):
        assert not (run / part).exists(), f"{run / part} was written by a run that failed on bad input"
    assert not list(run.rglob(".tmp-*")), list(run.rglob(".tmp-*"))


def _set(i, key, value):
    def f(rows):
        rows[i][key] = value
    return f


def _content(i, side, value):
    def f(rows):
        rows[i][side][1]["content"] = value
    return f


def _drop(i, key):
    def f(rows):
        del rows[i][key]
    return f


BAD_ROWS = [
    # (id, mutation, row, field)
    ("wrong_type", _set(2, "prompt", 42), 2, "prompt"),
    ("missing_field", _drop(7, "rejected"), 7, "rejected"),
    ("empty_string", _content(5, "chosen", "   "), 5, "chosen"),
    ("wrong_response_type", _set(10, "rejected", 3.5), 10, "rejected"),
]


@pytest.mark.parametrize("mutate,row,field", [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
def test_malformed_dataset_row_stops_the_run_naming_file_row_field(ray_local, tmp_path, model_dir, mutate, row, field):
    rows = fixture_rows()
    mutate(rows)
    data = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataError) as ei:
        run_spa(load_config(None, overrides(tmp_path / "runs", model_dir, data)))
    err = ei.value
    assert (Path(err.file).name, err.row, err.field) == ("broken.jsonl", row, field)
    assert f"broken.jsonl, row {row}, field '{field}'" in str(err)
    assert_nothing_half_written(tmp_path / "runs" / "bad")


def test_wrong_encoding_stops_the_run_naming_file_and_row(ray_local, tmp_path, model_dir):
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    lines[8] = lines[8][:30] + b"\xe9" + lines[8][30:]  # a Latin-1 byte in row 8
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match="UTF-8") as ei:
        run_spa(load_config(None, overrides(tmp_path / "runs", model_dir, data)))
    assert (Path(ei.value.file).name, ei.value.row) == ("latin1.jsonl", 8)
    assert_nothing_half_written(tmp_path / "runs" / "bad")


class OverlappingTask(UltraFeedbackTask):
    """A user task whose iteration-2 prompts repeat a seed prompt (a broken split)."""

    def prompt_splits(self, seed=0, **kw):
        s = super().prompt_splits(seed)
        return PromptSplits(seed=s.seed, iterations=[s.iterations[0], s.iterations[1] + s.seed[:1]], evaluation=s.evaluation)


def test_overlapping_prompt_sets_stop_the_run_naming_both_sets(ray_local, tmp_path, model_dir):
    task = f"{__name__}:OverlappingTask"
    with pytest.raises(ValueError, match=r"prompt sets must be disjoint: .* is in both 'seed' and 'iteration_2'"):
        run_spa(load_config(None, overrides(tmp_path / "runs", model_dir, FIXTURE, task=task)))
    assert_nothing_half_written(tmp_path / "runs" / "bad")


def test_duplicated_prompts_are_dropped_and_overlong_rows_truncated_at_prepare(ray_local, tmp_path, model_dir):
    """Documented policies, not errors: a repeated prompt keeps its first row (the splits
    stay disjoint); an over-long row is truncated to model.max_prompt_len / max_total_len. Both are counted."""
    rows = fixture_rows()
    rows[3]["chosen"][1]["content"] = "very long answer " * 200
    rows[3]["rejected"][1]["content"] = "another long answer " * 200
    data = write_jsonl(tmp_path / "dups.jsonl", rows + [rows[0], rows[1]])
    config = load_config(None, overrides(tmp_path / "runs", model_dir, data))
    with Run.open(config) as run:
        prepared = prepare_data(run)
    prompts = json.loads((tmp_path / "runs/bad/data/prepare/prompts.json").read_text())
    every = prompts["seed"] + [p for xs in prompts["iterations"] for p in xs] + prompts["evaluation"]
    assert len(every) == len(set(every)) and set(every) <= {r["prompt"] for r in rows}
    assert rows[0]["prompt"] in every or rows[1]["prompt"] in every  # the repeated prompts are in, once
    import pyarrow.parquet as pq

    table = pq.read_table(prepared.seed_pairs).to_pydict()
    holdout = pq.read_table(prepared.judge_holdout).to_pydict()
    for p, c, r in zip(table["prompt_ids"], table["chosen_ids"], table["rejected_ids"]):
        assert len(p) <= 48 and len(p) + len(c) <= 96 and len(p) + len(r) <= 96 and c and r
    # both policies are counted, not silent: per row, in the ledger and in metrics.jsonl
    long_row = rows[3]["prompt"]
    both = {**dict(zip(table["prompt"], table["truncated_tokens"])),
            **dict(zip(holdout["prompt"], holdout["truncated_tokens"]))}
    assert long_row not in both or both[long_row] > 0
    assert all(n == 0 for prompt, n in both.items() if prompt != long_row)
    info = json.loads((tmp_path / "runs/bad/stages.json").read_text())["finished"]["prepare"]
    assert info["duplicate_prompts_dropped"] == 2
    assert info["seed_pairs_truncated"] + info["judge_holdout_truncated"] == int(long_row in both)
    metrics = [json.loads(x) for x in (tmp_path / "runs/bad/metrics.jsonl").read_text().splitlines()]
    assert any(m.get("stage") == "prepare" and m.get("duplicate_prompts_dropped") == 2 for m in metrics)


def test_model_folder_without_tokenizer_is_named(ray_local, tmp_path):
    model = save_tiny_model_dir(tmp_path / "no_tokenizer", save_tokenizer=False)
    with pytest.raises(MissingTokenizerError, match="no_tokenizer"):
        run_spa(load_config(None, overrides(tmp_path / "runs", model, FIXTURE)))
    assert_nothing_half_written(tmp_path / "runs" / "bad")


def test_model_folder_without_chat_template_is_named(ray_local, tmp_path):
    model = save_tiny_model_dir(tmp_path / "no_template", chat_template=False)
    with pytest.raises(MissingChatTemplateError, match="no_template.*no chat template"):
        run_spa(load_config(None, overrides(tmp_path / "runs", model, FIXTURE)))
    assert_nothing_half_written(tmp_path / "runs" / "bad")


def test_model_folder_with_only_a_pickle_checkpoint_is_refused_before_any_stage(ray_local, tmp_path, model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(model_dir, model)
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors weights in .*pickled.*pytorch_model.bin"):
        run_spa(load_config(None, overrides(tmp_path / "runs", model, FIXTURE)))
    assert_nothing_half_written(tmp_path / "runs" / "bad")


def test_a_failed_start_does_not_lock_in_its_config(ray_local, tmp_path, model_dir):
    """The first attempt fails on a bad model folder; the corrected command is accepted."""
    bad = save_tiny_model_dir(tmp_path / "no_tokenizer", save_tokenizer=False)
    with pytest.raises(MissingTokenizerError):
        run_spa(load_config(None, overrides(tmp_path / "runs", bad, FIXTURE)))
    with Run.open(load_config(None, overrides(tmp_path / "runs", model_dir, FIXTURE))) as run:
        assert run.pi_init == str(model_dir)


@pytest.mark.parametrize(
    "extra, key",
    [
        (["placement.generators.num_gpus=1"], "placement.generators.num_gpus"),
        (["placement.judges.resources={gpu_pool: 1}"], "placement.judges.resources.gpu_pool"),
        (["placement.trainer.count=4"], "placement: generators, judges and trainer"),
        (["placement.trainer.num_cpus=3"], "placement.trainer.num_cpus"),
        (["placement.trainer.count=3", "placement.trainer.num_cpus=0.25"], "training.global_batch_size"),
    ],
    ids=["gpus_on_a_cpu_cluster", "missing_custom_resource", "more_cpus_than_the_cluster", "actor_larger_than_a_node",
         "batch_not_divisible_by_workers"],
)
def test_impossible_placement_is_refused_before_anything_is_written(ray_local, tmp_path, model_dir, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_spa(load_config(None, overrides(tmp_path / "runs", model_dir, FIXTURE, extra=extra)))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("training:\n  alhpa: 0.2\n", "training.alhpa"),
        ("training:\n  learning_rate: fast\n", "training.learning_rate"),
        ("training:\n  learning_rate: -1.0e-5\n", "training.learning_rate"),
        ("placement:\n  generators: {count: 0}\n", "count"),
        ("model:\n  max_prompt_len: 512\n  max_total_len: 256\n", "model.max_total_len"),
        ("generation:\n  top_p: 1.5\n", "generation.top_p"),
        ("run:\n  name: ../outside\n", "run.name"),
    ],
)
def test_bad_config_file_names_the_key_and_writes_nothing(tmp_path, yaml_text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, [f"run.root={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_cli_reports_bad_data_in_one_line_with_exit_2(tmp_path, model_dir):
    rows = fixture_rows()
    rows[4]["prompt"] = ""
    data = write_jsonl(tmp_path / "empty_prompt.jsonl", rows)
    for _ in range(3):  # a Ray head that cannot start on an overloaded machine is not under test here
        r = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "spa_run.py"), *overrides(tmp_path / "runs", model_dir, data)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )
        if "timed out during startup" not in r.stderr:
            break
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("spa_run: error:")]
    assert errors == [errors[0]] and "empty_prompt.jsonl, row 4, field 'prompt'" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert_nothing_half_written(tmp_path / "runs" / "bad")
