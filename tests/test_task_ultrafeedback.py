"""UltraFeedbackTask on the project's fixture file: splits, gold seed pairs, no gold judge."""

from pathlib import Path

import pytest

from spa_ray.tasks.base import load_task

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"


def test_task_from_import_path_splits_the_fixture():
    task = load_task(
        "spa_ray.tasks.ultrafeedback:UltraFeedbackTask",
        dataset=str(FIXTURE), seed_fraction=0.25, iteration_fractions=[0.25, 0.25], holdout_fraction=0.1,
    )
    splits = task.prompt_splits(seed=0)
    assert len(splits.iterations) == 2 and splits.seed and splits.evaluation
    assert splits == task.prompt_splits(seed=0) and splits != task.prompt_splits(seed=1)
    pairs = task.seed_pairs(splits.seed)
    assert [p.prompt for p in pairs] == splits.seed
    assert all(p.chosen_score >= p.rejected_score for p in pairs)
    with pytest.raises(NotImplementedError, match="alpaca_eval"):
        task.score(splits.evaluation[0], "anything")


def test_bad_fractions_are_named():
    with pytest.raises(ValueError, match="seed_fraction"):
        load_task("spa_ray.tasks.ultrafeedback:UltraFeedbackTask", dataset=str(FIXTURE),
                  seed_fraction=0.9, iteration_fractions=[0.5])
