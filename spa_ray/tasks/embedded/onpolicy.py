"""Gold-labelled pairs of the SFT model's own samples: on-policy preference data.

Demonstration-distribution pairs teach DPO only the defects the demonstrations show; the
SFT model also miscounts and names wrong items in its own way, and those errors are what
DPO on many pairs must remove (docs/world.md, "Session 7"). On-policy pairs are built as
SimPO's on-policy UltraFeedback is: ``n`` samples of pi_init per prompt, labelled by the
gold judge; chosen is the best one, rejected a random one scored strictly lower (or, with
``rejected="worst"``, the lowest-scored one, as SimPO's recipe takes); a prompt whose samples
all tie gives no pair.

``best_against_worse`` is the pure labelling rule; ``generate_samples`` the only part that
needs torch and a model (``from_pretrained`` on a path, like any pi_init).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..base import PreferencePair

REJECTED_RULES = ("random", "worst")

__all__ = ["REJECTED_RULES", "best_against_worse", "generate_samples", "onpolicy_pairs", "sample_responses"]


def best_against_worse(prompt: str, samples: Sequence[str], score: Callable[[str, str], float],
                       rng: random.Random, rejected: str = "random") -> PreferencePair | None:
    """UltraFeedback-binarized labelling: the best sample (the first among equals) against
    one drawn at random from those scored strictly lower (``rejected="random"``) or from
    the lowest-scored ones (``"worst"``, which shows the rarer defects more often); None
    when every sample ties."""
    if rejected not in REJECTED_RULES:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_RULES)}, got {rejected!r}")
    scored = [(score(prompt, s), s) for s in samples]
    best = max(s for s, _ in scored)
    worse = [(s, r) for s, r in scored if s < best]
    if not worse:
        return None
    if rejected == "worst":
        lowest = min(s for s, _ in worse)
        worse = [(s, r) for s, r in worse if s == lowest]
    chosen = next(r for s, r in scored if s == best)
    rejected_score, rejected_text = rng.choice(worse)
    return PreferencePair(prompt, chosen, rejected_text, best, rejected_score)


def generate_samples(model, tokenizer, prompts: Sequence[str], n: int, seed: int, temperature: float = 0.7,
                     max_new_tokens: int = 48, batch: int = 128) -> list[str]:
    """``n`` samples per prompt (row ``i * n + j``) by left-padded transformers ``generate``,
    pure sampling (top-k and top-p off). Deterministic for a given seed, prompt list and
    torch thread count (one seed for the whole list, so rows depend on their batch)."""
    import torch

    from .build import prompt_ids

    rows = [p for p in prompts for _ in range(n)]
    out: list[str] = []
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            enc = [prompt_ids(tokenizer, p) for p in rows[i : i + batch]]
            width = max(map(len, enc))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in enc])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc])
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += [tokenizer.decode(row, skip_special_tokens=True) for row in gen[:, width:]]
    return out


def sample_responses(model_path: str, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``generate_samples`` of the model at ``model_path``, as one list per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True).eval()
    out = generate_samples(model, tok, prompts, n, seed)
    return [out[j * n : (j + 1) * n] for j in range(len(prompts))]


def onpolicy_pairs(model_path: str, prompts: Sequence[str], score: Callable[[str, str], float], n: int,
                   seed: int, rejected: str = "random") -> list[PreferencePair]:
    """One gold pair per prompt from ``n`` of the model's samples (prompts whose samples all
    tie are dropped, so there may be fewer pairs than prompts)."""
    samples = sample_responses(model_path, prompts, n, seed)
    rng = random.Random(seed)
    pairs = [best_against_worse(p, s, score, rng, rejected) for p, s in zip(prompts, samples)]
    return [p for p in pairs if p is not None]
