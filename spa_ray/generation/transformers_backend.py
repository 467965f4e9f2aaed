"""Batched sampling with Hugging Face transformers (CPU or GPU).

How sampling is done
--------------------
``model.generate`` runs the decoding loop (KV cache, left-padding, position ids), in
greedy mode with one custom logits processor, ``SeededSampler``, that does the sampling
itself: at each step it tempers the logits (``/ temperature``), applies top-p, draws the
next token of EVERY ROW from that row's own ``torch.Generator`` (CPU, seeded per (prompt,
sample), see below), and returns logits that are -inf everywhere but the drawn token, so
greedy decoding picks exactly that token. This replaces ``do_sample=True`` +
``output_scores`` (one global RNG stream shared by the batch) and gives:

- Seeding guarantee: row (prompt i, sample j) draws its uniforms from a generator seeded
  with ``row_seed(sampling.seed, prompt text, occurrence, j)``. The random stream of a
  row does not depend on the batch it is in, on ``max_batch_size``, on the order of the
  prompt list, or on how prompts are sharded across actors. Same seed + same prompts +
  same weights => the same samples, up to floating-point differences of the logits
  between batch shapes (a padded batch row is not bit-identical to an unpadded one); such
  a difference changes a draw only when the uniform lands within ~1e-6 of a CDF
  boundary. On one machine and one batch split, results are exactly reproducible.
- ``GeneratedSequence.logprobs``: log-prob of each sampled token under the SAMPLING
  distribution (log_softmax(logits / T), renormalised over the top-p set). These are
  TEMPERED log-probs, not log pi(y_t|...); ``raw_logprobs`` carries log_softmax(logits)
  (untempered), computed in float32 during generation.

EOS handling: a response ends at the first EOS token (any of ``eos_token_ids``), and that
EOS token is KEPT as the last element of ``response_ids`` (finish_reason "stop") so that
the training masks include it, as the data layer does. Without EOS the response has
``max_new_tokens`` tokens (finish_reason "length"). Padding after EOS is never returned.

Batching: rows (prompt x sample) are sorted by prompt length (longest first, so an OOM
shows up at once), packed ``max_batch_size`` rows per ``generate`` call, LEFT-padded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

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

__all__ = ["TransformersGenerator", "SeededSampler", "sample_from_logits", "copy_state_dict_strict"]


def sample_from_logits(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling from tempered, top-p-filtered logits.

    logits [B, V] (any float), uniforms [B] in [0, 1). Returns (tokens [B] long,
    sampling log-prob of each token [B] float32, raw log_softmax(logits) of each token
    [B] float32). Tokens are sorted by probability (descending, stable) before the CDF
    is built; top-p keeps the smallest prefix whose mass reaches top_p (at least one
    token) and renormalises over it. temperature 0: greedy (argmax; `uniforms` unused).
    """
    logits = logits.float()
    raw_lp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:  # greedy: the first of the most likely tokens; its log pi as both log-probs
        tokens = torch.argmax(logits, dim=-1)
        token_raw_lp = raw_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
        return tokens, token_raw_lp, token_raw_lp
    lp = torch.log_softmax(logits / temperature, dim=-1)
    sorted_lp, order = torch.sort(lp, dim=-1, descending=True, stable=True)
    probs = sorted_lp.double().exp()
    if top_p < 1.0:
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep = mass_before < top_p
        keep[:, 0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        # renormalised log-probs over the kept set
        kept_lp = torch.where(keep, sorted_lp, torch.full_like(sorted_lp, float("-inf")))
        sorted_lp = kept_lp - torch.logsumexp(kept_lp, dim=-1, keepdim=True)
    cdf = torch.cumsum(probs, dim=-1)
    target = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # never land on a zero-probability (filtered) token at the tail
    pos = torch.minimum(pos, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    tokens = order.gather(-1, pos).squeeze(-1)
    sample_lp = sorted_lp.gather(-1, pos).squeeze(-1).float()
    token_raw_lp = raw_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    return tokens, sample_lp, token_raw_lp


class SeededSampler:
    """A transformers LogitsProcessor that samples each row with its own generator.

    Used with greedy decoding: it returns 0 at the drawn token and -inf elsewhere. It
    records, per step, the drawn tokens and their (sampling, raw) log-probs.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators = list(generators)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.tokens: list[torch.Tensor] = []
        self.sample_logprobs: list[torch.Tensor] = []
        self.raw_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededSampler built for {len(self.generators)} rows, got {scores.shape[0]}")
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        tokens, lp, raw = sample_from_logits(scores, u, self.temperature, self.top_p)
        self.tokens.append(tokens.cpu())
        self.sample_logprobs.append(lp.cpu())
        self.raw_logprobs.append(raw.cpu())
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens.unsqueeze(-1), 0.0)
        return out


def _tied_groups(model: torch.nn.Module) -> dict[str, set[str]]:
    """name -> names sharing its storage in model.state_dict() (tied weights)."""
    sd = model.state_dict()
    by_ptr: dict[tuple, set[str]] = {}
    for k, v in sd.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        by_ptr.setdefault(key, set()).add(k)
    return {k: names for names in by_ptr.values() for k in names}


def copy_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place; names and shapes must match.

    A missing key is accepted only when it is tied to a key that is present (e.g.
    lm_head.weight tied to embed_tokens.weight, which save_pretrained stores once).
    Values are converted to each parameter's dtype and device.
    """
    target = model.state_dict()
    unexpected = sorted(set(state_dict) - set(target))
    groups = _tied_groups(model)
    missing = sorted(k for k in set(target) - set(state_dict) if not (groups.get(k, {k}) & set(state_dict)))
    if unexpected or missing:
        raise ValueError(
            "state dict does not match the model: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise ValueError(f"shape mismatch in {len(bad)} tensors, e.g. {bad[:5]}")
    with torch.no_grad():
        for k, v in state_dict.items():
            target[k].copy_(v.to(device=target[k].device, dtype=target[k].dtype))


class TransformersGenerator(GeneratorBackend):
    """Sampling from a Hugging Face causal LM; see the module docstring for guarantees.

    Args:
        model_path: HF id or local directory (safetensors); tokenizer from the same place
            unless `tokenizer_path` is given.
        device, dtype: where and in which dtype the model runs ("auto" = checkpoint's).
        max_batch_size: rows (prompt x sample) per ``generate`` call.
        use_chat_template: render prompts as one user message through the chat template
            (default); False tokenizes the raw prompt text with special tokens.
        eos_token_ids: ids that end a response; default: the tokenizer's eos plus the
            model's generation_config eos ids.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        max_batch_size: int = 16,
        tokenizer_path: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        use_chat_template: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
    ):
        from spa_ray.models.loading import load_causal_lm, load_tokenizer

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if (model is None) == (model_path is None):
            raise ValueError("pass exactly one of model_path or model=")
        if model is None:
            model = load_causal_lm(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        else:
            model = model.to(device)
            model.eval()
        if tokenizer is None:
            tok_path = tokenizer_path if tokenizer_path is not None else model_path
            if tok_path is None:
                raise ValueError("pass tokenizer= (or tokenizer_path=) together with model=")
            tokenizer = load_tokenizer(
                tok_path,
                trust_remote_code=trust_remote_code,
                padding_side="left",
                require_chat_template=use_chat_template,
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token (load it with spa_ray.models.loading.load_tokenizer)")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        self.use_chat_template = use_chat_template
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_ids = self._resolve_eos(eos_token_ids)
        self._version = 0
        self._reset_generation_config()

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, device="cpu", **kwargs) -> "TransformersGenerator":
        """Wrap a live model + tokenizer (tests, or an actor that already holds them)."""
        return cls(None, device=device, model=model, tokenizer=tokenizer, **kwargs)

    # -- setup -------------------------------------------------------------------------
    def _resolve_eos(self, eos_token_ids) -> list[int]:
        if eos_token_ids is not None:
            ids = [int(i) for i in eos_token_ids]
        else:
            ids = []
            if self.tokenizer.eos_token_id is not None:
                ids.append(int(self.tokenizer.eos_token_id))
            gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            if gc_eos is not None:
                ids.extend(int(i) for i in (gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]))
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise ValueError("no EOS token id: the tokenizer has no eos token; pass eos_token_ids")
        return ids

    def _reset_generation_config(self) -> None:
        """Replace the model's generation_config by a neutral one.

        transformers fills unset generate() options from model.generation_config; a
        checkpoint's repetition penalty, suppressed tokens or forced tokens would then
        change the distribution before SeededSampler sees it. This generator owns its
        model, so it clears them.
        """
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )

    # -- prompts -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of one prompt as the model sees it (chat template + generation prompt)."""
        return encode_prompt(self.tokenizer, prompt, self.use_chat_template)

    # -- generation --------------------------------------------------------------------
    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[GeneratedSequence]:
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        return self.generate_from_ids(prompt_ids, sampling, prompt_keys=list(prompts))

    def generate_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        prompt_keys: Sequence[str] | None = None,
    ) -> list[GeneratedSequence]:
        """Like generate() for already tokenized prompts; `prompt_keys` key the seeds
        (default: the ids as text)."""
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        prompt_ids = [list(map(int, p)) for p in prompt_ids]
        for i, p in enumerate(prompt_ids):
            if not p:
                raise ValueError(f"prompt {i} has no tokens")
        keys = list(prompt_keys) if prompt_keys is not None else [" ".join(map(str, p)) for p in prompt_ids]
        if len(keys) != len(prompt_ids):
            raise ValueError("prompt_keys must have one key per prompt")
        occ = prompt_occurrences(keys)
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(sampling.n)]
        # longest prompts first; rows of one prompt stay together (stable sort)
        rows.sort(key=lambda r: -len(prompt_ids[r[0]]))
        results: dict[tuple[int, int], GeneratedSequence] = {}
        for start in range(0, len(rows), self.max_batch_size):
            batch = rows[start : start + self.max_batch_size]
            seeds = [row_seed(sampling.seed, keys[i], occ[i], j) for i, j in batch]
            for seq in self._generate_batch(batch, [prompt_ids[i] for i, _ in batch], seeds, sampling):
                results[(seq.prompt_index, seq.sample_index)] = seq
        return [results[(i, j)] for i in range(len(prompt_ids)) for j in range(sampling.n)]

    @torch.no_grad()
    def _generate_batch(self, rows, prompts, seeds, sampling: SamplingConfig) -> list[GeneratedSequence]:
        from transformers import LogitsProcessorList

        B = len(rows)
        P = max(len(p) for p in prompts)
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prompts):  # LEFT padding
            input_ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, P - len(p) :] = 1
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        sampler = SeededSampler(generators, sampling.temperature, sampling.top_p)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            do_sample=False,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            logits_processor=LogitsProcessorList([sampler]),
            return_dict_in_generate=False,
        )
        gen = out[:, P:].cpu()
        steps = min(gen.shape[1], len(sampler.tokens))
        drawn = torch.stack(sampler.tokens[:steps], dim=1) if steps else torch.empty(B, 0, dtype=torch.long)
        lps = torch.stack(sampler.sample_logprobs[:steps], dim=1) if steps else torch.empty(B, 0)
        raws = torch.stack(sampler.raw_logprobs[:steps], dim=1) if steps else torch.empty(B, 0)
        eos = set(self.eos_token_ids)
        result = []
        for b, (i, j) in enumerate(rows):
            toks = gen[b, :steps].tolist()
            cut = next((k + 1 for k, t in enumerate(toks) if t in eos), None)
            if cut is None:
                response, finish = toks[: sampling.max_new_tokens], FINISH_LENGTH
            else:
                response, finish = toks[:cut], FINISH_STOP  # EOS kept as the last token
            n = len(response)
            if drawn[b, :n].tolist() != response:
                raise RuntimeError(
                    "generate() returned tokens other than the ones SeededSampler drew; "
                    "another logits processor or a changed decoding loop is interfering"
                )
            result.append(
                GeneratedSequence(
                    prompt_index=i,
                    sample_index=j,
                    prompt_ids=list(prompts[b]),
                    response_ids=response,
                    text=self.tokenizer.decode(response, skip_special_tokens=True),
                    logprobs=lps[b, :n].tolist(),
                    finish_reason=finish,
                    raw_logprobs=raws[b, :n].tolist(),
                )
            )
        return result

    # -- weights -----------------------------------------------------------------------
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy `state_dict` into the model (strict names/shapes, tied keys may be absent)."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        copy_state_dict_strict(self.model, state_dict)
        self._version = version

    @property
    def weights_version(self) -> int:
        return self._version

    def weights_checksum(self) -> str:
        from spa_ray.models.loading import state_dict_checksum

        return state_dict_checksum(self.model)
