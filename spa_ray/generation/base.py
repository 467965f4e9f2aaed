"""The generator interface: sampling settings, generated sequences, and the backend ABC.

Two implementations: ``transformers_backend.TransformersGenerator`` (CPU or GPU, tested
here) and ``vllm_backend.VLLMGenerator`` (GPU, needs ``spa-ray[gpu]``).

Conventions shared by the backends:
- ``generate(prompts, sampling)`` returns ``len(prompts) * sampling.n`` sequences, in
  prompt order, then sample order: index ``i * n + j`` is sample j of prompt i.
- Prompts are plain user messages; the backend renders them with the tokenizer's chat
  template (``add_generation_prompt=True``). ``prompt_ids`` are the rendered tokens.
- ``response_ids`` end at the first EOS and INCLUDE that EOS token (finish_reason
  "stop"), so training masks built from them cover the EOS, as the data layer does; a
  response cut by ``max_new_tokens`` has no EOS (finish_reason "length").
- ``text`` is the decoded response without special tokens.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

__all__ = [
    "SamplingConfig",
    "GeneratedSequence",
    "GeneratorBackend",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "row_seed",
    "prompt_occurrences",
    "encode_prompt",
]

FINISH_STOP = "stop"  # ended with an EOS token (kept as the last response token)
FINISH_LENGTH = "length"  # hit max_new_tokens


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (SPA.md defaults: 2 samples, temperature 0.7, <= 300 new tokens).

    temperature 0 is greedy decoding (the most likely token, the lowest id among ties) in
    every backend; its per-token ``logprobs`` are then the untempered log pi.
    """

    n: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 300
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        m = self.max_new_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {m!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GeneratedSequence:
    """One sampled response.

    logprobs: per response token, the log-prob of the sampled token under the SAMPLING
      distribution (temperature- and top-p-adjusted), i.e. tempered log-probs, NOT
      log pi(y_t|...). None if the backend did not return them. Same length as
      response_ids when present.
    raw_logprobs: optional per-token log pi(y_t|...) under the generating model's
      untempered distribution, as computed during generation (KV cache, padded batch):
      close to but not bit-equal with a teacher-forced forward. None when unavailable.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    raw_logprobs: list[float] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def row_seed(seed: int, prompt_key: str, occurrence: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample): sha256 of (seed, prompt text, k-th occurrence, j).

    Keyed by the prompt's TEXT (plus which occurrence of that text in the call), not by
    its position, so the same prompt gets the same samples whatever list or shard it
    arrives in; a repeated prompt gets fresh samples for each repetition.
    """
    h = hashlib.sha256(f"{seed}\x00{occurrence}\x00{sample_index}\x00".encode() + prompt_key.encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def prompt_occurrences(prompts: list[str]) -> list[int]:
    """For each prompt, how many times the same text appeared before it in the list."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        k = seen.get(p, 0)
        out.append(k)
        seen[p] = k + 1
    return out


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of one prompt as the model sees it.

    With the chat template this is exactly the data layer's encoding
    (``spa_ray.data.tokenize.encode_prompt``), so seed pairs and self-generated pairs
    share one prompt format. Without: the raw text with the tokenizer's special tokens.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be str, got {type(prompt).__name__}")
    if use_chat_template:
        from spa_ray.data.tokenize import encode_prompt as encode_chat_prompt

        return encode_chat_prompt(tokenizer, prompt)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


class GeneratorBackend(ABC):
    """Samples responses from the current policy weights; weights can be replaced."""

    @abstractmethod
    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[GeneratedSequence]:
        """``len(prompts) * sampling.n`` sequences in prompt order, n per prompt."""

    @abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the model weights (same architecture, names checked) and record `version`."""

    @property
    @abstractmethod
    def weights_version(self) -> int:
        """Version of the weights in use (0 = as loaded from the checkpoint)."""
