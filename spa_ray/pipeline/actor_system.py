"""The driver's actors: generator and judge pools built from config, kept on the right weights.

Pools are created on first use at the weights the first stage needs, and afterwards
moved by the weight broadcast: when a stage asks for version v, every pool that holds
another version receives the checkpoint of v in one broadcast (object store on CPU,
a collective group to vLLM: NCCL on GPUs, gloo on CPU; timeout, then checkpoint-reload fallback), and every actor's
version is checked before the stage runs.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Callable

import ray

from spa_ray.actors.generator import GeneratorActor, check_generation_rows, generate_rows
from spa_ray.actors.judge import JudgeActor, label_rows
from spa_ray.actors.pool import ShardedActors, ShardedCall
from spa_ray.generation.base import SamplingConfig, prompt_occurrences
from spa_ray.weights.broadcast import broadcast_weights
from spa_ray.pipeline.config import ConfigError, SPAConfig


#: what ``broadcast_collective`` (spa_ray/weights/collective.py) asks Ray for its NCCL sender
NCCL_SENDER_DEMAND = {"CPU": 0.0, "GPU": 1.0}


def _per_actor(group) -> dict[str, float]:
    return {"CPU": group.num_cpus, "GPU": group.num_gpus, **group.resources}


def check_placement(config: SPAConfig, nodes: list[dict] | None = None) -> None:
    """ConfigError naming the ``placement.*`` key when the cluster cannot hold the actors.

    Generator and judge pools stay alive while the trainer group runs, so all three
    groups must fit at once: per resource, the sum of ``count x per-actor demand`` must
    not exceed the cluster's total, and each actor's demand must fit on one node.
    With ``weight_sync.method=nccl`` each broadcast also starts a sender actor holding
    one whole GPU beside the generators and judges (the trainer group has finished by
    then, so the sender is counted with the pools, not with the trainer).
    With ``generation.backend=vllm`` each generator owns whole GPUs, one per tensor-parallel
    rank: ``placement.generators.num_gpus`` must equal ``generation.tensor_parallel_size``
    (or be 0: vLLM's CPU backend; or a fraction of one GPU at tensor_parallel_size 1,
    shared with colocated actors by ``generation.gpu_memory_utilization``).
    Checked against the nodes alive now (``ray.nodes()``); set SPA_RAY_PLACEMENT_CHECK=0
    on an autoscaling cluster whose nodes are not up yet (the checks that need no
    cluster still run).
    """
    import os

    tr = config.training
    per_step = tr.micro_batch_size * config.placement.trainer.count
    if tr.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size ({tr.global_batch_size}) must be a multiple of training.micro_batch_size "
            f"({tr.micro_batch_size}) x placement.trainer.count ({config.placement.trainer.count})"
        )
    gen, gens = config.generation, config.placement.generators
    shares_one_gpu = gen.tensor_parallel_size == 1 and 0 < gens.num_gpus < 1
    if gen.backend == "vllm" and gens.num_gpus and gens.num_gpus != gen.tensor_parallel_size and not shares_one_gpu:
        raise ConfigError(
            f"placement.generators.num_gpus ({gens.num_gpus:g}) must equal generation.tensor_parallel_size "
            f"({gen.tensor_parallel_size}) with generation.backend=vllm: a vLLM engine owns whole GPUs, one per "
            "tensor-parallel rank (num_gpus 0 runs vLLM's CPU backend; a fraction below 1 shares one GPU at "
            "tensor_parallel_size 1, its memory split by generation.gpu_memory_utilization)"
        )
    if os.environ.get("SPA_RAY_PLACEMENT_CHECK", "1") == "0":
        return
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    p = config.placement
    groups = (("generators", p.generators), ("judges", p.judges), ("trainer", p.trainer))
    if config.judge.on_trainer:  # no judge pool: the trainer's ranks judge
        groups = (groups[0], groups[2])
    keys = {"CPU": "num_cpus", "GPU": "num_gpus"}
    for name, group in groups:
        for resource, amount in _per_actor(group).items():
            largest = max((float(n.get(resource, 0.0)) for n in nodes), default=0.0)
            if amount and amount > largest:
                key = f"placement.{name}.{keys.get(resource, 'resources.' + resource)}"
                raise ConfigError(
                    f"{key}: each of the {group.count} {name} actors asks for {amount:g} {resource}, but the "
                    f"largest node of the cluster has {largest:g} (cluster total {totals.get(resource, 0.0):g})"
                )
    nccl = config.weight_sync.method == "nccl"
    if nccl:
        largest = max((float(n.get("GPU", 0.0)) for n in nodes), default=0.0)
        if NCCL_SENDER_DEMAND["GPU"] > largest:
            raise ConfigError(
                f"weight_sync.method=nccl: its sender actor asks for {NCCL_SENDER_DEMAND['GPU']:g} GPU, but the "
                f"largest node of the cluster has {largest:g}; set weight_sync.method=object_store"
            )

    def refuse_excess(phase: list[tuple[str, int, dict[str, float]]], what: str) -> None:
        demand: dict[str, float] = {}
        for _, count, per_actor in phase:
            for resource, amount in per_actor.items():
                if amount:
                    demand[resource] = demand.get(resource, 0.0) + count * float(amount)
        for resource, amount in demand.items():
            if amount > totals.get(resource, 0.0) + 1e-9:
                parts = ", ".join(f"{name} {count} x {float(d.get(resource, 0.0)):g}" for name, count, d in phase)
                raise ConfigError(f"{what} ask for {amount:g} {resource} ({parts}), but the cluster has "
                                  f"{totals.get(resource, 0.0):g}")

    pools = [(name, g.count, _per_actor(g)) for name, g in groups if name != "trainer"]
    refuse_excess(pools + [("trainer", p.trainer.count, _per_actor(p.trainer))],
                  "placement: generators, judges and trainer are alive together and")
    if nccl:
        refuse_excess(pools + [("weight_sync sender", 1, NCCL_SENDER_DEMAND)],
                      "weight_sync.method=nccl: during each broadcast the generators, judges and the NCCL sender "
                      "are alive together and")


class ActorSystem:
    def __init__(self, config: SPAConfig, pi_init: str, weights_in_memory: dict | None = None,
                 label_on_trainer: Callable[[int, str, str | None, list[dict]], list[dict]] | None = None):
        self.config = config
        self.pi_init = pi_init
        # judge.on_trainer: (version, policy path, reference path, rows) -> labels, by the trainer's ranks
        self.label_on_trainer = label_on_trainer
        # checkpoint path -> WeightsHandle (the trainer's published copy): broadcast without a disk read
        self.weights_in_memory = weights_in_memory if weights_in_memory is not None else {}
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
            # vLLM returns one kind of log-prob per engine: the untempered log pi when the judge
            # reuses them (Eq. 7 needs log pi), else the sampling distribution's
            mode = "raw_logprobs" if self.config.judge.reuse_generator_logprobs else "processed_logprobs"
            kwargs.update(tensor_parallel_size=g.tensor_parallel_size, gpu_memory_utilization=g.gpu_memory_utilization,
                          logprobs_mode=mode, rpc_timeout_s=self.config.weight_sync.timeout_s,
                          engine_kwargs=dict(g.engine_kwargs))
        else:
            kwargs.update(max_batch_size=g.batch_size, trust_remote_code=self.config.model.trust_remote_code,
                          num_threads=group.threads)
        return ShardedActors(GeneratorActor, group, kwargs, name="generators")

    def _new_judges(self, version: int, path: str, reference: str | None) -> ShardedActors:
        j, group = self.config.judge, self.config.placement.judges
        kwargs = dict(
            policy_path=path, reference_path=reference, version=version, beta=j.beta,
            length_penalty=j.length_penalty, max_tokens_per_batch=j.max_tokens_per_batch,
            device=self._device(group.num_gpus), dtype=self.config.model.dtype,
            trust_remote_code=self.config.model.trust_remote_code, num_threads=group.threads,
        )
        return ShardedActors(JudgeActor, group, kwargs, name="judges")

    def _sync(self, version: int, path: str, using: ShardedActors) -> None:
        """Broadcast `path` as `version` to every existing pool that holds another version, then
        check that the pool the caller is about to use (``using``) holds it. Only that one:
        asking a pool that is busy sampling (gen_t, sent during health_t) for its version
        would wait for its current shard, which is what made the health check as long as
        generation."""
        stale = [p for p in (self.generators, self.judges) if p is not None and p.state["version"] != version]
        if stale:
            sync = self.config.weight_sync
            handle = self.weights_in_memory.get(str(path))
            report = broadcast_weights(stale, path, version, method=sync.method, timeout_s=sync.timeout_s,
                                       weights=handle if handle is not None and handle.version == version else None)
            self.reports.append(report)
            print(
                f"spa-ray: weights v{version} -> {sum(len(p) for p in stale)} actors via {report['method']} "
                f"in {report['seconds']:.2f}s ({report['bytes'] / 1e6:.1f} MB from "
                f"{'memory' if report['from_memory'] else 'the checkpoint'}, {report['fallbacks']} fallbacks)",
                flush=True,
            )
        using.require_version(version)

    # -- what stages ask for -----------------------------------------------------------------
    def generate(self, version: int, path: str, prompts: list[str], sampling: dict) -> list[dict]:
        """Samples of the policy `version` (checkpoint `path`), rows in prompt order."""
        if self.generators is None:
            self.generators = self._new_generators(version, path)
        self._sync(version, path, using=self.generators)
        return generate_rows(self.generators, prompts, sampling)

    def label(self, t: int, policy_path: str, previous_path: str, rows: list[dict]) -> list[dict]:
        """Eq. 7-8 labels by pi_{t-1} (version t) against the configured judge reference: by the
        judge pool, or by the trainer's ranks (judge.on_trainer)."""
        if self.label_on_trainer is not None:
            return self.label_on_trainer(t, policy_path, self._judge_reference_path(previous_path), list(rows))
        return label_rows(self._judges_for(t, policy_path, previous_path), rows)

    def _judge_reference_path(self, previous_path: str) -> str | None:
        return {"init": self.pi_init, "previous": previous_path, "none": None}[self.config.judge.reference]

    def _judges_for(self, t: int, policy_path: str, previous_path: str) -> ShardedActors:
        """The judge pool on pi_{t-1} (version t) and the configured reference."""
        reference = self._judge_reference_path(previous_path)
        if self.judges is None:
            self.judges = self._new_judges(t, policy_path, reference)
            self._judge_reference = reference
        self._sync(t, policy_path, using=self.judges)
        if reference != self._judge_reference:
            self.judges.set_reference(reference)
            self._judge_reference = reference
        return self.judges

    def start_generation(self, version: int, path: str, prompts: list[str], sampling: dict) -> ShardedCall:
        """Send every generator shard of ``prompts`` (policy ``version`` at ``path``) and return
        at once; ``generate_and_label(..., started=)`` collects them. Lets the judges do other
        work (the health check) while the generators sample."""
        if self.generators is None:
            self.generators = self._new_generators(version, path)
        self._sync(version, path, using=self.generators)
        prompts = list(prompts)
        generating = ShardedCall(self.generators, "generate", len(prompts), index_arg="first_index",
                                 sampling=dict(sampling))
        occurrences = prompt_occurrences(prompts)
        for k in range(len(generating.shards)):
            generating.submit(k, prompts, {"occurrences": occurrences})
        return generating

    def generate_and_label(self, t: int, policy_path: str, previous_path: str, prompts: list[str], sampling: dict,
                           pair_rows: Callable[[list[dict]], list[dict]], rows_per_prompt: int = 1,
                           started: ShardedCall | None = None) -> tuple[list[dict], list[dict], list[dict]]:
        """``generate`` with pi_{t-1}, and ``label`` of the pairs ``pair_rows`` makes of them
        (``rows_per_prompt`` rows per prompt, in prompt order), each judge shard sent as soon
        as the samples of its prompts exist: the judges work while the generators still
        sample. The judge shards are those ``label`` would use, so the labels are the same
        as labelling afterwards. ``started``: the same generation, sent earlier by
        ``start_generation``. Returns (generation rows, the judge rows labelled, their labels)."""
        prompts, per = list(prompts), rows_per_prompt
        generating = started or self.start_generation(t, policy_path, prompts, sampling)
        judges = self._judges_for(t, policy_path, previous_path)
        labelling = ShardedCall(judges, "label", len(prompts) * per)
        samples: list[list[dict] | None] = [None] * len(prompts)  # per prompt, once its shard is back
        judge_rows: list[dict | None] = [None] * (len(prompts) * per)
        sent: set[int] = set()
        while generating.pending or labelling.pending:
            ready, _ = ray.wait(list(generating.pending) + list(labelling.pending), num_returns=1)
            if ready[0] not in generating.pending:
                labelling.handle(ready[0])
                continue
            k = generating.handle(ready[0])
            if k is None:  # resubmitted after an actor died
                continue
            for row in generating.results[k]:
                index = row["prompt_index"]
                samples[index] = (samples[index] or []) + [row]
            for j, (start, stop) in enumerate(labelling.shards):
                first, last = start // per, (stop - 1) // per + 1  # the prompts of rows start..stop-1
                if j not in sent and all(samples[i] is not None for i in range(first, last)):
                    rows = pair_rows([r for i in range(first, last) for r in samples[i]])
                    judge_rows[start:stop] = rows[start - first * per:stop - first * per]
                    labelling.submit(j, judge_rows)
                    sent.add(j)
        rows = generating.collect()
        check_generation_rows(rows, len(prompts), SamplingConfig(**dict(sampling)).n, self.generators.name)
        return rows, judge_rows, labelling.collect()

    def label_by_model(self, model_path: str, rows: list[dict]) -> list[dict]:
        """Labels by a trained judge (judge.kind reward_model / llm_as_judge): rows carry the text
        fields prompt, response_1, response_2. The pool holds that one model (version 0) all run."""
        from spa_ray.actors.model_judge import ModelJudgeActor, label_rows_by_model

        if getattr(self, "model_judges", None) is None:
            group = self.config.placement.judges
            kwargs = dict(model_path=model_path, version=0, device=self._device(group.num_gpus), dtype=self.config.model.dtype)
            self.model_judges = ShardedActors(ModelJudgeActor, group, kwargs, name="model_judges")
        return label_rows_by_model(self.model_judges, rows)

    def shutdown(self) -> None:
        import ray

        for pool in (self.generators, self.judges, getattr(self, "model_judges", None)):
            if pool is not None:
                for actor in pool.actors:
                    ray.kill(actor)
        self.generators = self.judges = self.model_judges = None
