"""Weight broadcast: every actor ends on the new version and checksum, or falls back.

Real Ray with two generator actors and one judge actor; the tests run in file order
and move the pools through versions 1, 2, 3.
"""

import logging
import time

import pytest
import ray
import torch

from _tiny_model import save_tiny_model_dir, torch_single_thread  # noqa: F401
from spa_ray.actors import GeneratorActor, JudgeActor, ShardedActors, contiguous_shards
from spa_ray.models.loading import ChecksumAccumulator, load_causal_lm, load_checkpoint_state_dict, state_dict_checksum
from spa_ray.weights import (
    NcclUnavailableError,
    PackedStateDict,
    StaleWeightsError,
    WeightsMismatchError,
    broadcast_weights,
    check_weight_sync_method,
    pack_state_dict,
    unpack_state_dict,
)
from spa_ray.pipeline.config import ActorGroup
from spa_ray.weights.handle import publish_state_dict

# ----------------------------------------------------------------- pure helpers (no Ray)


def test_contiguous_shards_are_balanced_and_cover_each_item_once():
    assert contiguous_shards(5, 2) == [(0, 3), (3, 5)]
    assert contiguous_shards(1, 3) == [(0, 1), (1, 1), (1, 1)]
    for n in range(0, 12):
        for k in range(1, 5):
            shards = contiguous_shards(n, k)
            sizes = [b - a for a, b in shards]
            assert [i for a, b in shards for i in range(a, b)] == list(range(n))
            assert max(sizes) - min(sizes) <= 1


def test_packed_state_dict_round_trip_and_streamed_checksum():
    g = torch.Generator().manual_seed(0)
    sd = {
        "b.weight": torch.randn(3, 4, generator=g, dtype=torch.float32),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(4),
        "d.empty": torch.empty(0, 2),
    }
    back = unpack_state_dict(pack_state_dict(sd))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
    assert state_dict_checksum(back) == state_dict_checksum(sd)
    acc = ChecksumAccumulator()
    for k in sorted(sd):
        acc.update(k, sd[k])
    assert acc.hexdigest() == state_dict_checksum(sd)
    with pytest.raises(ValueError, match="sorted"):
        acc.update("a.bias", sd["a.bias"])


def test_nccl_config_on_cpu_fails_fast():
    with pytest.raises(NcclUnavailableError, match="generation.backend='vllm'"):
        check_weight_sync_method("nccl", generation_backend="transformers")
    with pytest.raises(NcclUnavailableError, match="generation.backend='vllm' on CPU"):
        check_weight_sync_method("gloo", generation_backend="transformers")
    with pytest.raises(ValueError, match="'object_store', 'nccl' or 'gloo'"):
        check_weight_sync_method("mpi")
    check_weight_sync_method("object_store", generation_backend="transformers")


# ---------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_ckpts")
    return [save_tiny_model_dir(root / f"v{v}", seed=v) for v in range(4)]


def _checksum(path):
    return state_dict_checksum(load_checkpoint_state_dict(path))


def _flaky_generator_class():
    """Object-store loads of one version are slow, of another fail (injected);
    checkpoint reloads always work."""

    class FlakyGenerator(GeneratorActor):
        def __init__(self, slow_on_version=None, fail_on_version=None, **kwargs):
            super().__init__(**kwargs)
            self.slow_on_version, self.fail_on_version = slow_on_version, fail_on_version

        def load_weights(self, state, version, checksum, path=None):
            if isinstance(state, PackedStateDict):
                if version == self.slow_on_version:
                    time.sleep(4.0)
                if version == self.fail_on_version:
                    raise RuntimeError("injected object-store failure")
            return super().load_weights(state, version, checksum, path=path)

    return FlakyGenerator


@pytest.fixture(scope="module")
def pools(ray_local, ckpts):
    gens = ShardedActors(
        _flaky_generator_class(), ActorGroup(count=2, num_cpus=0.5),
        dict(slow_on_version=2, fail_on_version=3, backend="transformers", model_path=str(ckpts[0]), version=0, dtype="float32", num_threads=1),
        name="gen",
    )
    judges = ShardedActors(
        JudgeActor, ActorGroup(count=1, num_cpus=0.5),
        dict(policy_path=str(ckpts[0]), reference_path=str(ckpts[0]), version=0, dtype="float32", num_threads=1),
        name="judge",
    )
    yield gens, judges
    gens.shutdown()
    judges.shutdown()


def test_broadcast_reaches_every_actor(pools, ckpts):
    gens, judges = pools
    want = _checksum(ckpts[0])
    assert [v["checksum"] for v in gens.versions() + judges.versions()] == [want] * 3
    report = broadcast_weights([gens, judges], ckpts[1], version=1, timeout_s=120)
    source = state_dict_checksum(load_causal_lm(ckpts[1]))  # the source model's own checksum
    assert report["checksum"] == source == _checksum(ckpts[1]) != want
    assert [a["actor"] for a in report["actors"]] == ["gen[0]", "gen[1]", "judge[0]"]
    node = ray.get_runtime_context().get_node_id()
    for a in report["actors"]:
        assert (a["version"], a["checksum"], a["path"], a["node_id"]) == (1, source, "object_store", node)
        assert a["bytes"] == report["bytes"] > 0 and a["seconds"] >= 0
    assert report["fallbacks"] == 0
    for info in gens.require_version(1) + judges.require_version(1):
        assert info["checksum"] == source and info["path"] == str(ckpts[1])


def test_stale_actor_is_named_and_resynced(pools, ckpts):
    gens, _ = pools
    ray.get(gens.actors[1].reload_from_checkpoint.remote(str(ckpts[0]), 0))  # gen[1] goes stale
    with pytest.raises(StaleWeightsError, match=r"'gen' must hold weights version 1.*gen\[1\] holds version 0"):
        gens.require_version(1)
    assert [v["version"] for v in gens.resync()] == [1, 1]
    gens.require_version(1)


def test_wrong_checksum_raises_and_leaves_the_actor_unusable(pools, ckpts):
    gens, _ = pools
    sd = load_checkpoint_state_dict(ckpts[2])
    with pytest.raises(WeightsMismatchError, match=r"gen\[0\].*checksum"):
        ray.get(gens.actors[0].load_weights.remote(sd, 2, "0" * 64))
    assert gens.versions()[0]["version"] is None
    with pytest.raises(StaleWeightsError, match=r"gen\[0\] holds version None"):
        gens.require_version(1)


def test_broadcast_timeout_falls_back_to_the_checkpoint(pools, ckpts, caplog):
    gens, judges = pools
    with caplog.at_level(logging.WARNING, logger="spa_ray.weights.broadcast"):
        report = broadcast_weights([gens, judges], ckpts[2], version=2, timeout_s=1.0, fallback_timeout_s=120)
    want = _checksum(ckpts[2])
    gen_rows = [a for a in report["actors"] if a["pool"] == "gen"]
    assert [(a["path"], a["version"], a["checksum"]) for a in gen_rows] == [("checkpoint_fallback", 2, want)] * 2
    assert all(a["error"] == "timed out after 1.0 s" for a in gen_rows)
    assert "gen[0] (timed out after 1.0 s)" in caplog.text and "gen[1] (timed out" in caplog.text
    assert [(a["version"], a["checksum"]) for a in report["actors"]] == [(2, want)] * 3  # the judge too
    assert report["fallbacks"] >= 2


def test_broadcast_load_error_falls_back_for_the_failing_actors_only(pools, ckpts, caplog):
    gens, judges = pools
    with caplog.at_level(logging.WARNING, logger="spa_ray.weights.broadcast"):
        report = broadcast_weights([gens, judges], ckpts[3], version=3, timeout_s=120)
    want = _checksum(ckpts[3])
    paths = {a["actor"]: a["path"] for a in report["actors"]}
    assert paths == {"gen[0]": "checkpoint_fallback", "gen[1]": "checkpoint_fallback", "judge[0]": "object_store"}
    assert all((a["version"], a["checksum"]) == (3, want) for a in report["actors"])
    assert "injected object-store failure" in caplog.text and "gen[1]" in caplog.text
    # nccl asked for on this CPU cluster: refused before anything moves
    with pytest.raises(NcclUnavailableError, match="vLLM generator actors"):
        broadcast_weights([gens, judges], ckpts[1], version=4, method="nccl")
    assert gens.state["version"] == 3
    gens.require_version(3)


def test_broadcast_from_a_published_handle_reads_no_checkpoint(pools, ckpts, tmp_path):
    """The trainer's published copy is sent as is: the checkpoint folder is not read (here
    it holds other weights, so a read would show up as another checksum)."""
    gens, judges = pools
    handle = publish_state_dict(load_checkpoint_state_dict(ckpts[1])).at(str(ckpts[2]), 5)
    report = broadcast_weights([gens, judges], ckpts[2], version=5, timeout_s=120, weights=handle)
    assert report["from_memory"] and report["fallbacks"] == 0 and report["checksum"] == _checksum(ckpts[1])
    assert [(a["version"], a["checksum"], a["path"]) for a in report["actors"]] == [(5, _checksum(ckpts[1]), "object_store")] * 3

