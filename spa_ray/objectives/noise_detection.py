"""De-coupled noise detection (SPA Eq. 11-12) and its lambda schedule.

The confidence that decides z comes from an extrapolated model whose per-token logits are
h_bar = (1 + lam) * h_theta - lam * h_ref: a stand-in for a model trained with a
(1 + lam)x weaker KL term, which separates clean from noisy pairs better than pi_theta.
The log_softmax of the mixture is not the mixture of the log_softmaxes, so this needs
the full logits of both models, which the DPO step already holds (no extra forward).

Memory: h_bar is never built for the whole sequence. We walk the sequence in chunks of
`chunk_size` positions, so the extra memory is a few [B, chunk, V] float32 buffers
regardless of T. Everything runs under no_grad: z is a label, not a gradient path.
"""

from __future__ import annotations

import torch

from ._checks import check_non_negative, check_same_shape
from .dpo import dpo_margin
from .logprobs import compute_dtype, gather_logprobs, validate_sequence_inputs

DEFAULT_CHUNK_SIZE = 128


@torch.no_grad()
def extrapolated_sequence_logprobs(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    lam: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log pi_bar(y|x) [B] (detached) with h_bar = (1+lam) h_theta - lam h_ref, response tokens only.

    lam = 0 gives the policy's own sequence log-probs. Computed in float32 (float64 if the
    logits are float64); policy and reference logits must share shape, dtype and device.
    """
    lam = check_non_negative("lam", lam)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    check_same_shape(policy_logits=policy_logits, ref_logits=ref_logits)
    if policy_logits.dtype != ref_logits.dtype or policy_logits.device != ref_logits.device:
        raise ValueError(
            f"policy_logits ({policy_logits.dtype}, {policy_logits.device}) and ref_logits "
            f"({ref_logits.dtype}, {ref_logits.device}) must share dtype and device"
        )
    target_mask, ids = validate_sequence_inputs(policy_logits, input_ids, response_mask, "policy_logits")
    dtype = compute_dtype(policy_logits.dtype)
    B, T, _ = policy_logits.shape
    total = torch.zeros(B, dtype=dtype, device=policy_logits.device)
    for s in range(0, T - 1, chunk_size):
        e = min(s + chunk_size, T - 1)
        # h = (1 + lam) * h_theta - lam * h_ref, built in place in ONE [B, chunk, V] buffer.
        h = policy_logits[:, s:e].to(dtype, copy=True)
        if lam != 0.0:
            h.mul_(1.0 + lam).add_(ref_logits[:, s:e].to(dtype), alpha=-lam)
        lp = gather_logprobs(h, ids[:, s:e])
        del h
        total += torch.where(target_mask[:, s:e], lp, torch.zeros((), dtype=dtype, device=lp.device)).sum(dim=1)
    return total


@torch.no_grad()
def decoupled_confidence(
    bar_chosen: torch.Tensor,
    bar_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """p_bar(y_w > y_l) = sigma(beta * ((bar_w - ref_w) - (bar_l - ref_l))) [B], detached."""
    return torch.sigmoid(dpo_margin(bar_chosen, bar_rejected, ref_chosen, ref_rejected, beta)).detach()


def lambda_for_iteration(t: int, first: float = 0.5) -> float:
    """lambda_t = first * 0.5**(t-1): 1/2, 1/4, 1/8 for iterations t = 1, 2, 3 (paper, Sec. 5.1)."""
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise ValueError(f"t (iteration) must be an int >= 1, got {t!r}")
    first = check_non_negative("first", first)
    return first * 0.5 ** (t - 1)
