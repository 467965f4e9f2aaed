"""SP2DPO: DPO with a per-pair temperature beta_i fixed before training (arXiv 2601.22385).

A teacher annotates each pair with the category of the quality gap, its magnitude and
the teacher's confidence; beta_i follows from those and stays fixed during training
(zero training-time overhead: the loss is DPO with beta set per pair). The paper's exact
mapping is not published. OUR DEFAULT: category multipliers c (safety 2, factuality
1.75, instruction-following 1.5, reasoning 1.25, helpfulness 1, style 0.5), magnitude
m in 1..5, confidence k in [0, 1],

    beta_i = clip(beta0 * c * (0.5 + m/5) * (0.5 + 0.5*k), 0.5*beta0, 2*beta0).

A larger beta_i keeps the policy closer to the reference on that pair's log-ratio while
making its margin count more in the logit: objective, confident, large gaps get a sharper
loss, subjective or doubtful ones a softer one. Only the loss uses beta_i; the judge and
SPA's noise detection keep the global beta. Pure torch, no Ray, no I/O.
"""

from __future__ import annotations

import torch

from ._checks import check_1d, check_floating, check_positive, check_same_shape

CATEGORY_MULTIPLIERS: dict[str, float] = {
    "safety": 2.0,
    "factuality": 1.75,
    "instruction_following": 1.5,
    "reasoning": 1.25,
    "helpfulness": 1.0,
    "style": 0.5,
}


def category_multiplier(category: str) -> float:
    """c for a category name (case/space/hyphen-insensitive); ValueError lists the names."""
    key = category.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in CATEGORY_MULTIPLIERS:
        raise ValueError(f"category {category!r} is not one of {sorted(CATEGORY_MULTIPLIERS)}")
    return CATEGORY_MULTIPLIERS[key]


def sp2dpo_beta(
    beta0: float, multiplier: torch.Tensor, magnitude: torch.Tensor, confidence: torch.Tensor
) -> torch.Tensor:
    """beta_i = clip(beta0*c*(0.5 + m/5)*(0.5 + 0.5k), 0.5*beta0, 2*beta0), per pair [B]."""
    beta0 = check_positive("beta0", beta0)
    check_same_shape(multiplier=multiplier, magnitude=magnitude, confidence=confidence)
    check_1d("multiplier", multiplier)
    if bool(((magnitude < 1) | (magnitude > 5)).any()):
        raise ValueError(f"magnitude must be in [1, 5], got {magnitude.tolist()}")
    if bool(((confidence < 0) | (confidence > 1)).any()):
        raise ValueError(f"confidence must be in [0, 1], got {confidence.tolist()}")
    raw = beta0 * multiplier * (0.5 + magnitude / 5.0) * (0.5 + 0.5 * confidence)
    return raw.clamp(min=0.5 * beta0, max=2.0 * beta0)


def per_pair_dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """m_i = beta_i * ((log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))); ref detached."""
    check_same_shape(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
        ref_rejected=ref_rejected, beta=beta,
    )
    check_1d("policy_chosen", policy_chosen)
    check_floating(policy_chosen=policy_chosen, beta=beta)
    if bool((beta <= 0).any()) or not bool(torch.isfinite(beta).all()):
        raise ValueError(f"beta must be finite and > 0 for every pair, got {beta.tolist()}")
    ref_logratio = ref_chosen.detach() - ref_rejected.detach()
    return beta.detach().to(policy_chosen.dtype) * ((policy_chosen - policy_rejected) - ref_logratio)


__all__ = ["CATEGORY_MULTIPLIERS", "category_multiplier", "per_pair_dpo_margin", "sp2dpo_beta"]
