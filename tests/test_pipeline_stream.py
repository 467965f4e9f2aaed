"""Judging streamed into generation: the judges label each shard of pairs while the
generators still sample, and the labels are the ones labelling after generation gives;
the generators start on gen_t while the judges run the health check, with the same samples.

Real parts: a local Ray cluster, two generator actors and one judge actor (8 generation
shards against 4 judge shards, so judge shards wait on generation shards across their
boundaries), the embedded task's stage functions, tiny Llama folders.
"""

import shutil

import pytest

import pyarrow.parquet as pq

from _tiny_model import save_tiny_model_dir
from spa_ray.pipeline.config import load_config
from spa_ray.pipeline.stages import (
    Run, _judge, _rows_digest, check_judge_health, generate_responses, judge_pairs, prepare_data,
)
from spa_ray.data.tables import read_parquet
from spa_ray.pipeline.self_labels import judge_rows


def _config(root, pi_init, stream, rule="first_two", n=2, extra=()):
    return load_config(None, [
        f"run.root={root}", f"run.name=stream_{stream}_{rule}", f"model.name_or_path={pi_init}", "run.iterations=1",
        f"judge.pair_rule={rule}", f"generation.responses_per_prompt={n}", *extra,
        "data.task_kwargs={n_iterations: [30], n_evaluation: 4}", "judge.health_floor=0.0", "audit.floor=0.0",
        f"judge.stream={str(stream).lower()}", "generation.max_new_tokens=12",
        "placement.generators.count=2", "placement.generators.num_cpus=0.5",
        "placement.judges.count=1", "placement.judges.num_cpus=0.5", "placement.trainer.num_cpus=0.5",
    ])


def _adopt_pi_0(run, source):
    with run.dir.stage_dir("train_0", "checkpoints", "pi_0") as out:
        shutil.copytree(source, out, dirs_exist_ok=True)


SELECT = ("judge.keep_fraction=0.5", "training.seed_replay=0.25")


@pytest.mark.parametrize("rule,n,rows_per_prompt,extra", [("first_two", 2, 1, ()), ("max_min", 3, 2, SELECT)])
def test_streamed_labels_equal_labels_after_generation(ray_local, tmp_path, rule, n, rows_per_prompt, extra):
    """max_min over 3 samples: 2 judge rows per prompt, so judge shards split prompts too;
    with it the confidence filter and seed replay, on the real seed pairs table."""
    pi_init = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    pi_0 = save_tiny_model_dir(tmp_path / "pi_0", seed=1)
    tables, samples, health = {}, {}, {}
    for stream in (True, False):
        with Run.open(_config(tmp_path, pi_init, stream, rule, n, extra)) as run:
            data = prepare_data(run)
            _adopt_pi_0(run, pi_0)
            health[stream] = check_judge_health(run, 1, data)
            # streaming: gen_1's samples were sent before the judges checked their health
            assert sorted(run.generation_ahead) == ([1] if stream else [])
            generations = generate_responses(run, 1, data.iteration_prompts[0])
            assert run.generation_ahead == {}  # taken by gen_1
            samples[stream] = pq.read_table(generations).to_pydict()
            if stream:
                digest, ahead = run.labels_ahead[1]
                assert len(ahead) == 30 * rows_per_prompt and len(run.actors.generators.actors) == 2
                # the same rows labelled afterwards, as judge_pairs would without streaming
                rows = judge_rows(read_parquet(generations), rule, False, where=generations)[1]
                assert digest == _rows_digest(rows), "judge_1 would not recognise the rows it labelled"
                assert _judge(run, 1, rows) == ahead
            pairs = judge_pairs(run, 1, generations)
            assert run.labels_ahead == {}  # taken by judge_t
            tables[stream] = pq.read_table(pairs).to_pydict()
            judged = pq.read_table(pairs.with_name("judged.parquet")).to_pydict()
            info = run.dir.stage_info("judge_1")
            # first_two: the default filter (the top 25%); max_min: SELECT's 50%
            fraction = run.config.judge.keep_fraction
            assert fraction == (0.5 if extra else 0.25)
            assert sum(judged["kept"]) == info["kept"] == round(fraction * len(judged["kept"]))
            kept_margins = [m for m, k in zip(judged["margin"], judged["kept"]) if k]
            assert min(kept_margins) >= max([m for m, k in zip(judged["margin"], judged["kept"]) if not k], default=0)
            sources = tables[stream]["source"]
            trained = sum(k and not a for k, a in zip(judged["kept"], judged["audit"]))
            assert sources.count("self") == trained and info["audit_pairs"] == sum(judged["audit"])
            assert sources.count("seed") == info["replayed"] == (round(sources.count("self") / 3) if extra else 0)
    assert tables[True] == tables[False]
    assert samples[True] == samples[False] and health[True] == health[False]


def test_the_health_check_does_not_wait_for_the_generators_it_started(ray_local, tmp_path):
    """health_t labels while gen_t samples: the judge call must not ask the busy generators
    anything (a version check queues behind their shard, which made health_t as long as
    generation at full size). Here: a label call returns while no generation shard is done."""
    import ray

    from spa_ray.pipeline.stages import _gen_seed, _policy_path, _sampling

    pi_init = save_tiny_model_dir(tmp_path / "pi_init", seed=0)
    pi_0 = save_tiny_model_dir(tmp_path / "pi_0", seed=1)
    config = load_config(None, [
        f"run.root={tmp_path}", "run.name=busy", f"model.name_or_path={pi_init}", "run.iterations=1",
        "data.task_kwargs={n_iterations: [64], n_evaluation: 4}", "generation.max_new_tokens=48",
        "placement.generators.count=2", "placement.generators.num_cpus=0.5",
        "placement.judges.count=1", "placement.judges.num_cpus=0.5", "placement.trainer.num_cpus=0.5",
    ])
    with Run.open(config) as run:
        data = prepare_data(run)
        _adopt_pi_0(run, pi_0)
        rows = [{"prompt_ids": [5, 6], "response_ids_1": [7, 8], "response_ids_2": [9], "prompt": "p",
                 "response_1": "a", "response_2": "b"}] * 4
        first = _judge(run, 1, rows)  # the judge pool exists and holds pi_0 before generation starts
        prompts = data.iteration_prompts[0]
        started = run.actors.start_generation(1, _policy_path(run, 0), prompts, _sampling(run, _gen_seed(run, 1)))
        assert _judge(run, 1, rows) == first
        done, _ = ray.wait(list(started.pending), num_returns=len(started.pending), timeout=0)
        assert not done, "the judge call waited for a generation shard"
        ray.get(list(started.pending))
