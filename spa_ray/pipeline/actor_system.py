"""The driver's actors: generator and judge pools built from config, kept on the right weights.

Pools are created on first use at the weights the first stage needs, and afterwards
moved by the weight broadcast: when a stage asks for version v, every pool that holds
another version receives the checkpoint of v in one broadcast (object store on CPU,
NCCL to vLLM on GPUs; timeout, then checkpoint-reload fallback), and every actor's
version is checked before the stage runs.
"""

from __future__ import annotations

from typing import Any

from spa_ray.actors.generator import GeneratorActor, generate_rows
from spa_ray.actors.judge import JudgeActor, label_rows
from spa_ray.actors.pool import ShardedActors
from spa_ray.actors.weight_sync import broadcast_weights
from spa_ray.pipeline.config import SPAConfig


class ActorSystem:
    def __init__(self, config: SPAConfig, pi_init: str):
        self.config = config
        self.pi_init = pi_init
        self.generators: ShardedActors | None = None
        self.judges: ShardedActors | None = None
        self._judge_reference: str | None = None  # the reference the judge pool holds
        self.reports: list[dict[str, Any]] = []

    # -- pools --------------------------------------------------------------------------
    def _device(self, num_gpus: float) -> str:
        return "cuda" if num_gpus > 0 else "cpu"

    def _new_generators(self, version: int, path: str) -> ShardedActors:
        g, group = self.config.generation, self.config.placement.generators
        kwargs: dict[str, Any] = dict(
            backend=g.backend, model_path=path, version=version,
            device=self._device(group.num_gpus), dtype=self.config.model.dtype,
        )
        if g.backend == "vllm":
            kwargs.update(tensor_parallel_size=g.tensor_parallel_size, gpu_memory_utilization=g.gpu_memory_utilization)
        else:
            kwargs.update(max_batch_size=g.batch_size, trust_remote_code=self.config.model.trust_remote_code)
        return ShardedActors(GeneratorActor, group, kwargs, name="generators")

    def _new_judges(self, version: int, path: str, reference: str | None) -> ShardedActors:
        j, group = self.config.judge, self.config.placement.judges
        kwargs = dict(
            policy_path=path, reference_path=reference, version=version, beta=j.beta,
            length_penalty=j.length_penalty, max_tokens_per_batch=j.max_tokens_per_batch,
            device=self._device(group.num_gpus), dtype=self.config.model.dtype,
            trust_remote_code=self.config.model.trust_remote_code,
        )
        return ShardedActors(JudgeActor, group, kwargs, name="judges")

    def _sync(self, version: int, path: str) -> None:
        """Broadcast `path` as `version` to every existing pool that holds another version."""
        stale = [p for p in (self.generators, self.judges) if p is not None and p.state["version"] != version]
        if stale:
            sync = self.config.weight_sync
            report = broadcast_weights(stale, path, version, method=sync.method, timeout_s=sync.timeout_s)
            self.reports.append(report)
            print(
                f"spa-ray: weights v{version} -> {sum(len(p) for p in stale)} actors via {report['method']} "
                f"in {report['seconds']:.2f}s ({report['bytes'] / 1e6:.1f} MB, {report['fallbacks']} fallbacks)",
                flush=True,
            )
        for pool in (self.generators, self.judges):
            if pool is not None and pool.state["version"] == version:
                pool.require_version(version)

    # -- what stages ask for -----------------------------------------------------------------
    def generate(self, version: int, path: str, prompts: list[str], sampling: dict) -> list[dict]:
        """Samples of the policy `version` (checkpoint `path`), rows in prompt order."""
        if self.generators is None:
            self.generators = self._new_generators(version, path)
        self._sync(version, path)
        return generate_rows(self.generators, prompts, sampling)

    def label(self, t: int, policy_path: str, previous_path: str, rows: list[dict]) -> list[dict]:
        """Eq. 7-8 labels by pi_{t-1} (version t) against the configured judge reference."""
        reference = {"init": self.pi_init, "previous": previous_path, "none": None}[self.config.judge.reference]
        if self.judges is None:
            self.judges = self._new_judges(t, policy_path, reference)
            self._judge_reference = reference
        self._sync(t, policy_path)
        if reference != self._judge_reference:
            self.judges.set_reference(reference)
            self._judge_reference = reference
        return label_rows(self.judges, rows)

    def shutdown(self) -> None:
        import ray

        for pool in (self.generators, self.judges):
            if pool is not None:
                for actor in pool.actors:
                    ray.kill(actor)
        self.generators = self.judges = None
