"""GeneratorActor: a thin Ray shell around a GeneratorBackend (transformers or vLLM).

A plain class: ``ShardedActors`` applies ``ray.remote`` with the resources from config.
Rows are plain dicts (no live objects cross the boundary). Seeds come from the prompt
TEXT (``generation.base.row_seed``), so how prompts are sharded over actors does not
change which samples a prompt gets; ``first_index`` only renumbers ``prompt_index``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from spa_ray.actors.base import WeightedActor, copy_and_verify, model_checksum
from spa_ray.generation.base import SamplingConfig, encode_prompt, prompt_occurrences
from spa_ray.models.loading import checkpoint_tensor_names
from spa_ray.weights.errors import EngineWeightsError, WeightsError, WeightsMismatchError

logger = logging.getLogger(__name__)

__all__ = ["GeneratorActor", "generate_rows"]

# KV cache of a vLLM engine on CPU unless engine_kwargs say otherwise (vLLM's own default
# takes most of the machine's free memory)
CPU_KV_CACHE_BYTES = 1 << 30


class GeneratorActor(WeightedActor):
    """Samples responses with the policy weights it holds.

    Args:
        backend: "transformers" (CPU/GPU) or "vllm" (GPU; unrun on the CPU machine).
        model_path: checkpoint folder (safetensors + tokenizer) of the weights at `version`.
        version: weights version those are (0 = pi_init).
        device, dtype: transformers backend placement ("auto" = checkpoint dtype);
            vLLM takes dtype only (it owns its GPUs).
        num_threads: torch intra-op threads in this actor (default: leave Ray's setting).
        label: name used in logs and errors (the pool passes "<pool>[i]").
        **backend_kwargs: passed to the backend, e.g. max_batch_size (transformers),
            tensor_parallel_size, gpu_memory_utilization, max_model_len (vLLM).
    """

    SUPPORTS_COLLECTIVE_BACKENDS = ("vllm",)  # the weight-update group (weight_sync.method nccl / gloo)

    def __init__(
        self,
        backend: str = "transformers",
        model_path: str | os.PathLike | None = None,
        version: int = 0,
        device: str = "cpu",
        dtype: str = "auto",
        num_threads: int | None = None,
        label: str | None = None,
        **backend_kwargs,
    ):
        if model_path is None:
            raise ValueError("GeneratorActor needs model_path")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.backend = backend
        if backend == "transformers":
            from spa_ray.generation.transformers_backend import TransformersGenerator

            self.engine = TransformersGenerator(model_path, device=device, dtype=dtype, **backend_kwargs)
            self._names = checkpoint_tensor_names(model_path)
        elif backend == "vllm":
            from spa_ray.generation.vllm_backend import VLLMGenerator

            engine_kwargs = dict(backend_kwargs.pop("engine_kwargs", None) or {})
            if device == "cpu":  # vLLM's CPU backend: no CUDA graphs; a KV cache bounded like a GPU's
                engine_kwargs.setdefault("enforce_eager", True)
                engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
            self.engine = VLLMGenerator(model_path, dtype=dtype, engine_kwargs=engine_kwargs, **backend_kwargs)
            self._names = None
        else:
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")
        self._init_weights_state(label, model_path, version)

    # -- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        first_index: int = 0,
        sampling: Mapping | SamplingConfig | None = None,
        occurrences: list[int] | None = None,
    ) -> list[dict]:
        """``len(prompts) * n`` rows in prompt order, then sample order.

        Row keys: prompt_index (= first_index + position), sample_index, prompt,
        prompt_ids, response_ids, text, logprobs (tempered sampling log-probs),
        raw_logprobs, finish_reason, policy_version.

        Seeds: the backend seeds (prompt text, k-th occurrence of that text in its call,
        sample). A shard sees only part of the list, so a repeated prompt's local
        occurrence can differ from its place in the whole list; `occurrences` gives the
        GLOBAL occurrence of each prompt (``generate_rows`` passes it). A prompt whose
        global occurrence k > 0 is then seeded by the key "<text>\\x00occurrence=<k>"
        (occurrence 0 of that key), a function of (text, k) alone: sharding never changes
        samples. With no repeats (or occurrences=None) the seeds are exactly the
        backend's own, so the rows equal a direct backend ``generate`` call.
        """
        if self._version is None:
            raise WeightsMismatchError(f"{self.actor_label}: weights are in an unknown state (a load failed); reload first")
        if sampling is None:
            sampling = SamplingConfig()
        elif not isinstance(sampling, SamplingConfig):
            sampling = SamplingConfig(**dict(sampling))
        prompts = list(prompts)
        if occurrences is None:
            occurrences = prompt_occurrences(prompts)
        if len(occurrences) != len(prompts):
            raise ValueError(f"occurrences has {len(occurrences)} entries for {len(prompts)} prompts")
        keys = [p if k == 0 else f"{p}\x00occurrence={int(k)}" for p, k in zip(prompts, occurrences)]
        prompt_ids = [encode_prompt(self.engine.tokenizer, p, self.engine.use_chat_template) for p in prompts]
        rows = []
        for seq in self.engine.generate_from_ids(prompt_ids, sampling, prompt_keys=keys):
            row = seq.to_dict()
            row["prompt"] = prompts[seq.prompt_index]
            row["prompt_index"] = int(first_index) + seq.prompt_index
            row["policy_version"] = self._version
            rows.append(row)
        return rows

    # -- weights -------------------------------------------------------------------------
    def _load_verified(self, state_dict, version, checksum) -> str:
        if self.backend == "transformers":
            got = copy_and_verify(self.engine.model, state_dict, checksum, self.actor_label)
            self.engine._version = version  # keep the backend's own record in step
            self._names = sorted(state_dict)
            return got
        # vLLM maps HF names onto its fused layout: its workers checksum the tensors they
        # rebuilt and loaded; that must be the sender's checksum.
        got = self.engine.load_weights(state_dict, version)
        if got != checksum:
            raise WeightsMismatchError(f"{self.actor_label}: vLLM workers loaded checksum {got[:12]}, expected {checksum[:12]}")
        return got

    def reload_from_checkpoint(self, path, version: int) -> dict:
        """The fallback and re-sync path. vLLM: its workers read the folder themselves."""
        if self.backend != "vllm":
            return super().reload_from_checkpoint(path, version)
        import time

        t0 = time.perf_counter()
        self._version, self._checksum = None, None
        try:
            if self.engine.broken is None:
                try:
                    got = self.engine.reload_from_path(path, version)
                except EngineWeightsError as exc:
                    logger.warning("%s: %s; rebuilding the vLLM engine from %s", self.actor_label, exc, os.fspath(path))
                    got = self.engine.rebuild(path, version)
            else:  # a failed or timed-out RPC left replies queued: only a new engine is safe
                logger.warning("%s: vLLM engine broken (%s); rebuilding it from %s", self.actor_label, self.engine.broken,
                               os.fspath(path))
                got = self.engine.rebuild(path, version)
        except Exception as exc:
            raise WeightsError(f"{self.actor_label}: reloading {os.fspath(path)} as version {version} failed: {exc}") from exc
        self._version, self._checksum, self._path = version, got, os.fspath(path)
        return {**self.weights_info(), "seconds": time.perf_counter() - t0, "bytes": 0}

    def _live_checksum(self) -> str:
        if self.backend == "transformers":
            return model_checksum(self.engine.model, self._names)
        return self.engine.weights_checksum()

    # -- collective path (vLLM only: NCCL between GPUs, gloo between CPU processes) -------
    def _vllm_engine(self):
        if self.backend != "vllm":
            raise ValueError(f"{self.actor_label}: the collective weight path needs the vLLM backend, not {self.backend!r}")
        return self.engine

    def collective_world_size(self) -> int:
        """Ranks this actor contributes to a weight-update group: its engine's real world
        size (tensor x pipeline parallel workers), read from the running engine."""
        return self._vllm_engine().world_size()

    def collective_init_group(self, backend: str, master_address: str, master_port: int, rank_offset: int,
                              world_size: int, timeout_s: float = 300.0) -> None:
        self._vllm_engine().collective_init(backend, master_address, master_port, rank_offset, world_size, timeout_s)

    def collective_receive(self, metadata: list, version: int, checksum: str, path=None) -> dict:
        """Receive every tensor of `metadata` (sorted names) from rank 0 into the engine."""
        import time

        engine = self._vllm_engine()
        t0 = time.perf_counter()
        self._version, self._checksum = None, None
        got = engine.collective_receive(metadata, version)
        if got != checksum:
            raise WeightsMismatchError(f"{self.actor_label}: vLLM workers received checksum {got[:12]}, expected {checksum[:12]}")
        self._version, self._checksum = version, got
        if path is not None:
            self._path = os.fspath(path)
        nbytes = sum(int(torch.empty(0, dtype=getattr(torch, d)).element_size()) * _numel(s) for _, d, s in metadata)
        return {**self.weights_info(), "seconds": time.perf_counter() - t0, "bytes": nbytes}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def generate_rows(pool, prompts: list[str], sampling: Mapping | SamplingConfig) -> list[dict]:
    """Generate over a ShardedActors pool of GeneratorActors; rows in prompt order.

    Checks that every prompt came back exactly ``n`` times, numbered 0..len-1.
    """
    if isinstance(sampling, SamplingConfig):
        sampling = sampling.to_dict()
    n = SamplingConfig(**dict(sampling)).n
    prompts = list(prompts)
    rows = pool.map_shards(
        "generate", prompts, index_arg="first_index",
        shard_kwargs={"occurrences": prompt_occurrences(prompts)}, sampling=dict(sampling),
    )
    check_generation_rows(rows, len(prompts), n, pool.name)
    return rows


def check_generation_rows(rows: list[dict], num_prompts: int, n: int, pool_name: str) -> None:
    """RuntimeError unless every prompt came back exactly ``n`` times, in prompt order."""
    expected = [(i, j) for i in range(num_prompts) for j in range(n)]
    got = [(r["prompt_index"], r["sample_index"]) for r in rows]
    if got != expected:
        raise RuntimeError(
            f"generation over {pool_name} returned {len(rows)} rows, expected {len(expected)} "
            "(each prompt exactly n times, in prompt order)"
        )
