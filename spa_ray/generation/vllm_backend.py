"""Sampling with vLLM (GPU). Needs the optional extra: ``pip install 'spa-ray[gpu]'``.

NOT RUN ON THE MACHINE THIS WAS WRITTEN ON (no GPU, no vLLM there). Only the pure helpers
(`vllm_sampling_kwargs`, `vllm_engine_kwargs`, `request_seed`, `iter_state_dict_chunks`)
are unit-tested; the engine calls were written against vLLM's documented offline API
(``vllm.LLM``, ``SamplingParams``, ``TokensPrompt``, ``LLM.collective_rpc`` with a
``worker_extension_cls``, as in vLLM's RLHF examples) and must be checked on a GPU.

``import vllm`` happens only inside functions/constructors, never at module import, so
this module imports fine on a CPU-only install.

Semantics, matched to the transformers backend where vLLM allows it:
- Prompts are rendered with OUR tokenizer's chat template (``base.encode_prompt``) and
  sent as token ids (``TokensPrompt``), so both backends see identical prompt tokens.
- Seeds: one request per prompt with ``SamplingParams(n=..., seed=request_seed(...))``,
  the seed keyed by (sampling seed, prompt text, occurrence) as in the transformers
  backend: a prompt's samples do not depend on batch composition or sharding. The
  samples themselves differ from the transformers backend's (different RNG).
- ``logprobs=0`` returns the sampled token's log-prob; the engine is created with
  ``logprobs_mode="processed_logprobs"`` (after temperature / top-p), so
  ``GeneratedSequence.logprobs`` are TEMPERED log-probs as in the transformers backend.
  Pass ``logprobs_mode="raw_logprobs"`` to get log pi(y_t|...) instead (then they are
  stored in ``raw_logprobs`` and ``logprobs`` is None).
- EOS: vLLM keeps the EOS id in ``token_ids`` when it stops on EOS; it is kept as the
  last response token (finish_reason "stop"), like the data layer. If it is absent for
  a stop on EOS, it is appended and the per-token log-probs are dropped (None).
- Weights: ``load_weights(state_dict, version)`` sends the (HF-named) tensors in chunks
  through ``collective_rpc("spa_load_weights")`` to every worker, where the model's own
  ``load_weights`` maps HF names onto vLLM's fused layout, then resets the prefix cache
  (cached KV blocks were computed with the old weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

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
    "SPAWorkerExtension",
    "vllm_sampling_kwargs",
    "vllm_engine_kwargs",
    "request_seed",
    "iter_state_dict_chunks",
    "WORKER_EXTENSION_CLS",
]

WORKER_EXTENSION_CLS = "spa_ray.generation.vllm_backend.SPAWorkerExtension"
_MISSING_VLLM = "vLLM is not installed: the vLLM generator needs `pip install 'spa-ray[gpu]'` (GPU machines only)"


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
        dtype=dtype,
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
    state_dict: Mapping[str, torch.Tensor], max_bytes: int = 1 << 30
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


# --------------------------------------------------------------- worker-side extension
class SPAWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); runs inside the workers.

    vLLM adds these methods to its worker class, so ``self.model_runner`` and
    ``self.device`` are the worker's. Called through ``LLM.collective_rpc``.
    """

    def spa_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model
        load = getattr(model, "load_weights", None)
        if load is None:  # a compiled / CUDA-graph wrapper around the model
            load = model.runnable.load_weights
        device = getattr(self, "device", None) or next(model.parameters()).device
        load(weights=((name, t.to(device, non_blocking=True)) for name, t in named_tensors))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(named_tensors)


# ----------------------------------------------------------------------- the generator
class VLLMGenerator(GeneratorBackend):
    """GeneratorBackend on a ``vllm.LLM`` engine (one engine per generator actor).

    NOT RUN on the machine this was written on; see the module docstring.
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
        weight_chunk_bytes: int = 1 << 30,
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
        ids = list(eos_token_ids) if eos_token_ids is not None else [self.tokenizer.eos_token_id]
        self.eos_token_ids = [int(i) for i in ids if i is not None]
        if not self.eos_token_ids:
            raise ValueError("no EOS token id: pass eos_token_ids")
        self.llm = LLM(
            **vllm_engine_kwargs(
                model_path,
                dtype=dtype,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                trust_remote_code=trust_remote_code,
                logprobs_mode=logprobs_mode,
                extra=engine_kwargs,
            )
        )
        self._version = 0

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

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        for chunk in iter_state_dict_chunks(state_dict, self.weight_chunk_bytes):
            self.llm.collective_rpc("spa_load_weights", args=(chunk,))
        self.llm.reset_prefix_cache()
        self._version = version

    @property
    def weights_version(self) -> int:
        return self._version
