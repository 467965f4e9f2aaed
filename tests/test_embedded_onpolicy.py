"""On-policy gold pairs (``EmbeddedTask(pair_source="sft")``): the labelling rule alone, then
real samples of a tiny model built here, loaded through ``from_pretrained``."""

import random

import pytest

from spa_ray.tasks.embedded import EmbeddedTask
from spa_ray.tasks.embedded.build import TINY_BUILD, build_embedded_model
from spa_ray.tasks.embedded.onpolicy import best_against_worse


def _length_score(prompt, response):
    return float(len(response.split()))


def test_best_against_worse_takes_the_first_best_and_a_strictly_worse_one():
    samples = ["a b", "a b c", "x y z", "a"]
    for seed in range(20):
        pair = best_against_worse("p", samples, _length_score, random.Random(seed))
        assert pair.chosen == "a b c"  # the first of the two best (3 words)
        assert pair.rejected in {"a b", "a"}  # never the other 3-word sample
        assert pair.chosen_score == 3.0 and pair.rejected_score == _length_score("p", pair.rejected)
    draws = {best_against_worse("p", samples, _length_score, random.Random(s)).rejected for s in range(20)}
    assert draws == {"a b", "a"}  # the rejected one is drawn, not always the worst


def test_worst_rule_rejects_a_lowest_scored_sample_drawn_among_equals():
    samples = ["a b", "a b c", "x", "a b c d", "y"]
    draws = set()
    for seed in range(20):
        pair = best_against_worse("p", samples, _length_score, random.Random(seed), rejected="worst")
        assert pair.chosen == "a b c d" and pair.rejected_score == 1.0
        draws.add(pair.rejected)
    assert draws == {"x", "y"}  # ties at the bottom are drawn, not the first always
    # with two samples the rules agree
    assert best_against_worse("p", ["a", "a b"], _length_score, random.Random(0), rejected="worst") == \
        best_against_worse("p", ["a", "a b"], _length_score, random.Random(0))


def test_best_against_worse_gives_no_pair_when_all_samples_tie():
    assert best_against_worse("p", ["a b", "c d", "e f"], _length_score, random.Random(0)) is None


@pytest.mark.parametrize("kwargs, field", [({"pair_source": "gpt4"}, "pair_source"), ({"pair_samples": 1}, "pair_samples"),
                                           ({"pair_rejected": "median"}, "pair_rejected")])
def test_bad_pair_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EmbeddedTask(**kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded-cache")
    return str(build_embedded_model(cache_dir=root, spec=TINY_BUILD, log=lambda m: None))


def test_onpolicy_seed_pairs_are_gold_ordered_samples_of_the_model(tiny_model):
    task = EmbeddedTask(pair_source="sft", pair_samples=4, pair_model=tiny_model)
    prompts = task.prompt_splits(0).seed[:40]
    pairs = task.seed_pairs(prompts, seed=0)
    assert 0 < len(pairs) <= len(prompts)
    assert [p.prompt for p in pairs] == [p for p in prompts if p in {q.prompt for q in pairs}]  # prompt order kept
    for p in pairs:
        assert p.chosen_score == task.score(p.prompt, p.chosen) > p.rejected_score == task.score(p.prompt, p.rejected)
    assert task.seed_pairs(prompts, seed=0) == pairs  # deterministic
    other = task.seed_pairs(prompts, seed=1)
    assert [(p.chosen, p.rejected) for p in other] != [(p.chosen, p.rejected) for p in pairs]
    # the responses are the model's, not the demonstrations': the off-policy pairs differ
    demos = EmbeddedTask().seed_pairs(prompts, seed=0)
    assert {(p.chosen, p.rejected) for p in pairs}.isdisjoint({(p.chosen, p.rejected) for p in demos})
    assert task.describe()["pair_source"] == "sft"


def test_the_pipeline_samples_onpolicy_pairs_from_its_own_pi_init(ray_local, tmp_path, tiny_model):
    """``data.task_kwargs={pair_source: sft}`` with ``model.name_or_path`` set: the prepare
    stage's gold pairs are that model's samples (not the default embedded build's), split
    into seed pairs and the judge's hold-out as usual."""
    import pyarrow.parquet as pq

    from spa_ray.pipeline.config import load_config
    from spa_ray.pipeline.stages import Run, prepare_data

    config = load_config(None, [f"run.root={tmp_path}", "run.name=onpolicy", f"model.name_or_path={tiny_model}",
                                "data.task_kwargs={pair_source: sft, pair_samples: 2}",
                                "data.judge_holdout_fraction=0.05"])
    with Run.open(config) as run:
        assert run.task.pair_model == tiny_model
        prepared = prepare_data(run)
    direct = EmbeddedTask(pair_source="sft", pair_samples=2, pair_model=tiny_model)
    expected = direct.seed_pairs(direct.prompt_splits(config.run.seed).seed, seed=config.run.seed)
    tables = [pq.read_table(path).to_pydict() for path in (prepared.judge_holdout, prepared.seed_pairs)]
    assert sum(len(t["gold_chosen"]) for t in tables) == len(expected)
    assert [g for t in tables for g in t["gold_rejected"]] == [p.rejected_score for p in expected]
    # an explicit pair_model wins over the run's pi_init
    pinned = EmbeddedTask(pair_source="sft", pair_model="elsewhere")
    pinned.use_policy(tiny_model)
    assert pinned.pair_model == "elsewhere"
