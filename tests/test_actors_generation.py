"""Generator actors on a local Ray cluster: sharding, ordering, and surviving a killed actor.

Real parts: Ray (2 CPUs), tiny Llama checkpoints saved with save_pretrained, the
transformers backend. Actors ask for 0.5 CPU so that four fit.
"""

import os
import threading
import time
from pathlib import Path

import pytest
import ray

from _tiny_model import save_tiny_model_dir, torch_single_thread  # noqa: F401
from spa_ray.actors import GeneratorActor, ShardedActors, generate_rows
from spa_ray.models.loading import load_checkpoint_state_dict
from spa_ray.weights import StaleWeightsError, broadcast_weights
from spa_ray.generation.base import SamplingConfig
from spa_ray.models.loading import state_dict_checksum
from spa_ray.pipeline.config import ActorGroup

PROMPTS = [
    "list three colors",
    "name two animals",
    "give me one fruit",
    "list three colors",  # a repeat gets fresh samples (occurrence 1)
    "is the cat red ?",
]
# max_batch_size = n: each generate batch is one prompt's samples, whatever the sharding,
# so results are bit-identical across shardings (no padding differences).
SAMPLING = dict(n=2, temperature=1.0, max_new_tokens=8, seed=5)
GEN_KW = dict(backend="transformers", device="cpu", dtype="float32", num_threads=1, max_batch_size=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_ckpts")
    return [save_tiny_model_dir(root / f"v{v}", seed=v) for v in range(2)]


def _slow_generator_class(marker_dir: str):
    """A GeneratorActor whose second shard, while <marker_dir>/slow exists, signals that
    it started and then works slowly (so a test can kill it mid-call)."""

    class SlowGenerator(GeneratorActor):
        def generate(self, prompts, first_index=0, **kwargs):
            if first_index > 0 and Path(marker_dir, "slow").exists():
                Path(marker_dir, f"started-{os.getpid()}").touch()
                time.sleep(3.0)
            return super().generate(prompts, first_index=first_index, **kwargs)

    return SlowGenerator


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def pool(ray_local, ckpts, marker_dir):
    """Two generator actors (Ray retries on), shared by the tests below, in file order."""
    p = ShardedActors(
        _slow_generator_class(str(marker_dir)), ActorGroup(count=2, num_cpus=0.5),
        dict(model_path=str(ckpts[0]), version=0, **GEN_KW), name="gen", max_task_retries=2,
    )
    yield p
    p.shutdown()


def test_two_actors_match_one_actor_in_prompt_order(pool, ckpts):
    rows2 = generate_rows(pool, PROMPTS, SAMPLING)
    assert len(rows2) == len(PROMPTS) * SAMPLING["n"]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows2] == [
        (i, j) for i in range(len(PROMPTS)) for j in range(2)
    ]
    assert [r["prompt"] for r in rows2] == [p for p in PROMPTS for _ in range(2)]
    assert all(r["policy_version"] == 0 for r in rows2)
    # the two actors really shared the work (two processes), samples differ
    assert len({r["pid"] for r in pool.versions()}) == 2
    assert len({tuple(r["response_ids"]) for r in rows2}) > 1
    # one actor (the same class, in this process) on the whole list: the same rows
    one = GeneratorActor(model_path=str(ckpts[0]), **GEN_KW)
    rows1 = one.generate(PROMPTS, 0, SAMPLING)
    keys = ("prompt_index", "sample_index", "prompt", "prompt_ids", "response_ids", "text", "logprobs", "finish_reason")
    assert [{k: r[k] for k in keys} for r in rows2] == [{k: r[k] for k in keys} for r in rows1]
    # the repeated prompt got fresh samples
    assert [rows2[i]["response_ids"] for i in (0, 1)] != [rows2[i]["response_ids"] for i in (6, 7)]
    # prompts without repeats: exactly the backend's own samples (same seeds)
    direct = one.engine.generate(PROMPTS[:3], SamplingConfig(**SAMPLING))
    assert [s.response_ids for s in direct] == [r["response_ids"] for r in rows2[:6]]
    # an empty shard (more actors than prompts) is fine
    assert [r["prompt_index"] for r in generate_rows(pool, PROMPTS[:1], SAMPLING)] == [0, 0]


def _run_stage_and_kill(pool, marker_dir, no_restart):
    (marker_dir / "slow").touch()
    for f in marker_dir.glob("started-*"):
        f.unlink()
    out: dict = {}

    def stage():
        try:
            out["rows"] = generate_rows(pool, PROMPTS, SAMPLING)
        except BaseException as exc:  # surfaced in the main thread
            out["error"] = exc

    worker = threading.Thread(target=stage)
    worker.start()
    deadline = time.time() + 600
    while not list(marker_dir.glob("started-*")) and time.time() < deadline and worker.is_alive():
        time.sleep(0.05)
    assert list(marker_dir.glob("started-*")), f"the second shard never started: {out.get('error')!r}"
    ray.kill(pool.actors[1], no_restart=no_restart)  # dies in the middle of its generate call
    worker.join(timeout=900)  # a hang guard only: a restart on a loaded 2-core machine can take minutes
    (marker_dir / "slow").unlink()
    assert not worker.is_alive()
    assert "error" not in out, out.get("error")
    rows = out["rows"]
    # right count, no duplicates, prompt order, every row made with version 1
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (i, j) for i in range(len(PROMPTS)) for j in range(2)
    ]
    assert all(r["policy_version"] == 1 for r in rows)
    return rows


def test_killed_actor_mid_stage_is_restarted_on_current_weights(pool, ckpts, marker_dir):
    """Ray restarts the actor (re-init from v0) and retries the call; call_synced reloads v1."""
    broadcast_weights(pool, ckpts[1], version=1, timeout_s=120)
    before = pool.versions()
    rows = _run_stage_and_kill(pool, marker_dir, no_restart=False)
    after = pool.require_version(1)
    assert after[1]["pid"] != before[1]["pid"]  # a new process ...
    want = state_dict_checksum(load_checkpoint_state_dict(ckpts[1]))
    assert [a["checksum"] for a in after] == [want, want]  # ... back on version 1
    clean = generate_rows(pool, PROMPTS, SAMPLING)  # what it made equals a clean run
    assert [r["response_ids"] for r in clean] == [r["response_ids"] for r in rows]


def test_dead_actor_shard_is_retried_by_the_pool_on_another_actor(pool, ckpts, marker_dir, caplog):
    """An actor that cannot come back: RayActorError reaches the pool, which reruns the shard."""
    expected = generate_rows(pool, PROMPTS, SAMPLING)
    with caplog.at_level("WARNING", logger="spa_ray.actors.pool"):
        rows = _run_stage_and_kill(pool, marker_dir, no_restart=True)
    assert [r["response_ids"] for r in rows] == [r["response_ids"] for r in expected]
    assert "gen[1] died during generate" in caplog.text and "retrying on gen[0]" in caplog.text
    with pytest.raises(StaleWeightsError, match=r"gen\[1\] holds version None \(ActorDiedError\)"):
        pool.require_version(1)
