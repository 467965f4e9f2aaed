"""S-SPPO: SPPO's squared loss with semantically calibrated targets (arXiv 2606.01561).

Base SPPO loss (uclaml/SPPO), per pair, with eta = 1/beta and log-ratios against pi_t:

    0.5 * [(log pi/pi_t (y_w) - eta*(P_w - 1/2))^2 + (log pi/pi_t (y_l) - eta*(P_l - 1/2))^2]

P is each response's estimated probability of beating the current policy. With SPA's
implicit judge on two samples and p = p(y_w > y_l): P_w = (1/2 + p)/2, P_l = (1/2 + 1 - p)/2
(each response against itself counts 1/2).

Calibration (the paper's exact form is not public; OUR DEFAULT): a gate from the cosine
similarity s of the two responses' sentence embeddings, g = clip((s - 0.8)/(0.98 - 0.8), 0, 1),
pulls the targets to one half, P~ = 1/2 + (1 - g)(P - 1/2): near-identical responses stop
being pushed apart by a confident judge. A latent repulsion
0.05 * mean(max(0, cos(hbar_w, hbar_l) - 0.5)) on mean-pooled last hidden states keeps
the two responses' representations apart. Pure torch, no Ray, no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import as_bool_mask, check_1d, check_non_negative, check_positive, check_same_shape


def win_probabilities(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_w, P_l) = ((1/2 + p)/2, (1/2 + (1 - p))/2) from p = p(y_w > y_l) of a 2-sample judge."""
    check_1d("p", p)
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"p must be in [0, 1], got {p.tolist()}")
    return (0.5 + p) / 2.0, (0.5 + (1.0 - p)) / 2.0


def semantic_gate(similarity: torch.Tensor, low: float = 0.8, high: float = 0.98) -> torch.Tensor:
    """g = clip((s - low)/(high - low), 0, 1): 0 for distinct responses, 1 for near-duplicates."""
    if not high > low:
        raise ValueError(f"high must exceed low, got low={low}, high={high}")
    return ((similarity - low) / (high - low)).clamp(0.0, 1.0)


def calibrate_targets(P: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """P~ = 1/2 + (1 - g)(P - 1/2): the gate pulls a target towards 'no preference'."""
    check_same_shape(P=P, gate=gate)
    return 0.5 + (1.0 - gate) * (P - 0.5)


def sppo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    target_chosen: torch.Tensor,
    target_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per pair [B]: 0.5*[(lr_w - (P_w - 1/2)/beta)^2 + (lr_l - (P_l - 1/2)/beta)^2], ref detached."""
    beta = check_positive("beta", beta)
    check_same_shape(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
        ref_rejected=ref_rejected, target_chosen=target_chosen, target_rejected=target_rejected,
    )
    check_1d("policy_chosen", policy_chosen)
    eta = 1.0 / beta
    lr_w = policy_chosen - ref_chosen.detach()
    lr_l = policy_rejected - ref_rejected.detach()
    tw = target_chosen.detach().to(lr_w.dtype)
    tl = target_rejected.detach().to(lr_l.dtype)
    return 0.5 * ((lr_w - eta * (tw - 0.5)) ** 2 + (lr_l - eta * (tl - 0.5)) ** 2)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [N, T, H] over positions where mask [N, T] is true -> [N, H]."""
    m = as_bool_mask("mask", mask)
    if hidden.dim() != 3 or tuple(m.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden [N, T, H] and mask [N, T] must match, got {tuple(hidden.shape)}, {tuple(m.shape)}")
    counts = m.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"rows {torch.nonzero(counts == 0).flatten().tolist()} have no masked position")
    w = m.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(dim=1) / counts.to(hidden.dtype).unsqueeze(-1)


def latent_repulsion(
    h_chosen: torch.Tensor, h_rejected: torch.Tensor, weight: float = 0.05, margin: float = 0.5
) -> torch.Tensor:
    """weight * mean(max(0, cos(h_w, h_l) - margin)), scalar, differentiable in both."""
    check_non_negative("weight", weight)
    if h_chosen.shape != h_rejected.shape or h_chosen.dim() != 2:
        raise ValueError(f"h_chosen and h_rejected must share one [B, H] shape, got {tuple(h_chosen.shape)}, "
                         f"{tuple(h_rejected.shape)}")
    cos = F.cosine_similarity(h_chosen, h_rejected, dim=-1)
    return weight * torch.relu(cos - margin).mean()


__all__ = ["calibrate_targets", "latent_repulsion", "mean_pool", "semantic_gate", "sppo_loss", "win_probabilities"]
