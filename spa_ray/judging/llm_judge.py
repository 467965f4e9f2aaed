"""LLM-as-judge (SPA's Table 2 baseline "Iterative DPO, LLM-as-judge"), the pure parts.

The judge reads (docs: /work/shared/spec/VARIANTS.md; the paper's Listing 1, after
Bai et al.'s pairwise comparison prompt)::

    Consider the following conversation between a human and an assistant: [prompt]
    Please choose the response that is the most helpful, honest, and harmless.
    Options: (A) [r1] (B) [r2] The answer is:

and prefers the option whose answer "(A)" or "(B)" has the higher log-prob. Both
orders are scored and averaged against position bias. Our averaging (the paper does
not spell it out): with ``lA, lB`` the answers' log-probs in the order (y1, y2) and
``lA', lB'`` in the swapped order (y2, y1),

    r1 = (lA + lB') / 2        (log-prob that y1 is named, over both orders)
    r2 = (lB + lA') / 2
    p(y1 > y2) = sigma(r1 - r2)

so the labels, ties and probabilities come from ``implicit_reward.label_pairs`` exactly
as for SPA's own judge. In the paper the judge is the SFT model fine-tuned (3 epochs,
lr 2e-5, batch 32) on the seed pairs written in this format (Listing 2): every seed pair
gives two examples, one per order, whose target is the chosen response's letter
(:func:`judge_sft_examples`; training in ``judging.judge_models``).

Pure torch and strings: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..objectives._checks import check_1d, check_floating, check_same_shape

__all__ = [
    "ANSWER_A",
    "ANSWER_B",
    "JUDGE_TEMPLATE",
    "judge_prompt",
    "judge_sft_examples",
    "option_logprobs",
    "two_order_rewards",
]

ANSWER_A = "(A)"
ANSWER_B = "(B)"
JUDGE_TEMPLATE = (
    "Consider the following conversation between a human and an assistant: {prompt} "
    "Please choose the response that is the most helpful, honest, and harmless. "
    "Options: (A) {response_a} (B) {response_b} The answer is:"
)


def judge_prompt(prompt: str, response_a: str, response_b: str) -> str:
    """The judge's question with ``response_a`` as option (A) and ``response_b`` as (B)."""
    return JUDGE_TEMPLATE.format(prompt=prompt.strip(), response_a=response_a.strip(), response_b=response_b.strip())


def judge_sft_examples(pairs: Sequence) -> list[tuple[str, str]]:
    """(judge prompt, answer) examples from gold pairs (objects with prompt/chosen/rejected):
    two per pair, chosen as (A) -> "(A)" and chosen as (B) -> "(B)" (so no position is favoured)."""
    out = []
    for p in pairs:
        out.append((judge_prompt(p.prompt, p.chosen, p.rejected), ANSWER_A))
        out.append((judge_prompt(p.prompt, p.rejected, p.chosen), ANSWER_B))
    return out


@torch.no_grad()
def option_logprobs(next_token_logits: torch.Tensor, id_a: int, id_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p("(A)"), log p("(B)") [N] (float64) from the logits [N, V] of the token after
    the question, each answer being one token of the judge's vocabulary."""
    if next_token_logits.dim() != 2:
        raise ValueError(f"next_token_logits must be [N, V], got {tuple(next_token_logits.shape)}")
    check_floating(next_token_logits=next_token_logits)
    V = next_token_logits.shape[1]
    for name, i in (("id_a", id_a), ("id_b", id_b)):
        if not 0 <= int(i) < V:
            raise ValueError(f"{name}={i} is outside the vocabulary of {V} tokens")
    if int(id_a) == int(id_b):
        raise ValueError(f"id_a and id_b must differ (both {id_a}): the answers would always tie")
    logp = torch.log_softmax(next_token_logits.detach().to(torch.float64), dim=-1)
    return logp[:, int(id_a)], logp[:, int(id_b)]


@torch.no_grad()
def two_order_rewards(
    a_in_order: torch.Tensor, b_in_order: torch.Tensor, a_swapped: torch.Tensor, b_swapped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2) [N] float64 from the answers' log-probs in both orders (module docstring).

    ``a_in_order``/``b_in_order``: log p("(A)")/log p("(B)") with (A) = y1, (B) = y2;
    ``a_swapped``/``b_swapped``: the same with (A) = y2, (B) = y1.
    """
    check_same_shape(a_in_order=a_in_order, b_in_order=b_in_order, a_swapped=a_swapped, b_swapped=b_swapped)
    check_1d("a_in_order", a_in_order)
    check_floating(a_in_order=a_in_order, b_in_order=b_in_order, a_swapped=a_swapped, b_swapped=b_swapped)
    f64 = [t.detach().to(torch.float64) for t in (a_in_order, b_in_order, a_swapped, b_swapped)]
    r1 = 0.5 * (f64[0] + f64[3])
    r2 = 0.5 * (f64[1] + f64[2])
    return r1, r2
