"""One preference-optimisation step's loss: plain DPO or SPA's refined DPO (Eq. 5-6, 9-12).

Pure torch, no Ray and no optimizer: the trainer calls this, then backward/step. It runs
ONE policy forward over chosen and rejected stacked along the batch (one kernel launch
sequence, and DDP/FSDP see a single forward per step) and one reference forward under
no_grad. The de-coupled confidence reuses those same logits (no extra forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..objectives.confidence_window import ConfidenceWindow
from ..objectives.dpo import dpo_loss, dpo_margin
from ..objectives.logprobs import sequence_logprobs
from ..objectives.noise_detection import DEFAULT_CHUNK_SIZE, decoupled_confidence, extrapolated_sequence_logprobs
from ..objectives.refined import refined_dpo_loss

if TYPE_CHECKING:
    from ..variants.objective import VariantObjective

SIDES = ("chosen", "rejected")
FIELDS = ("input_ids", "attention_mask", "response_mask")


@dataclass
class PreferenceStepOutput:
    """loss: scalar with grad (mean over the local pairs). stats: python floats for metrics.
    z, confidence: per-pair [B] detached (None for plain DPO), e.g. for the pairs table."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    z: torch.Tensor | None = None
    confidence: torch.Tensor | None = None


def concat_preference_batch(batch: dict, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack chosen over rejected -> {input_ids, attention_mask, response_mask} [2B, T].

    Both sides are right-padded to the longer length (pad id, mask 0): with right padding
    and causal attention, the extra tail changes no logit at a real position.
    """
    missing = [f"{s}_{f}" for s in SIDES for f in FIELDS if f"{s}_{f}" not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}")
    for s in SIDES:
        shapes = {f"{s}_{f}": tuple(batch[f"{s}_{f}"].shape) for f in FIELDS}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(f"{s} tensors must share one [B, T] shape, got {shapes}")
    b_c, b_r = batch["chosen_input_ids"].shape[0], batch["rejected_input_ids"].shape[0]
    if b_c != b_r or b_c == 0:
        raise ValueError(f"chosen and rejected must hold the same number (>0) of pairs, got {b_c} and {b_r}")
    return {f: stack_right_padded([batch[f"{s}_{f}"] for s in SIDES], pad_token_id if f == "input_ids" else 0)
            for f in FIELDS}


def stack_right_padded(tensors: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Stack [B_i, T_i] tensors into [sum B_i, max T_i], right-padding each with `fill`."""
    T = max(t.shape[1] for t in tensors)
    parts = []
    for t in tensors:
        padded = t.new_full((t.shape[0], T), fill)
        padded[:, : t.shape[1]] = t
        parts.append(padded)
    return torch.cat(parts, dim=0)


def preference_step(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batch: dict,
    *,
    beta: float = 0.1,
    refine: bool = False,
    alpha: float = 0.1,
    lam: float = 0.5,
    window: ConfidenceWindow | None = None,
    step: int = 0,
    total_steps: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pad_token_id: int = 0,
    objective: "VariantObjective | None" = None,
) -> PreferenceStepOutput:
    """DPO (refine=False) or SPA refined DPO (refine=True) loss and stats for one batch.

    refine=True needs `window` (shared across steps; under DP its `gather` must all-gather,
    and every rank must call this at every step). lam = 0 uses pi_theta's own confidence
    (self-refinement without de-coupled detection); lam > 0 the extrapolated model.

    ``objective`` (a ``spa_ray.variants.objective.VariantObjective``) plugs a variant in:
    a per-pair beta for the loss margin, extra rows in the policy forward, hidden states,
    and the final loss. None (SPA) runs exactly the code path without it. The judge-scale
    confidence and noise flags always use the global ``beta``.
    """
    if refine and window is None:
        raise ValueError("window (a ConfidenceWindow) is required when refine=True")
    cat = concat_preference_batch(batch, pad_token_id)
    B = batch["chosen_input_ids"].shape[0]
    ids, attn, resp = cat["input_ids"], cat["attention_mask"], cat["response_mask"]

    if objective is None:
        policy_logits = policy(input_ids=ids, attention_mask=attn).logits
    else:
        policy_logits, variant_rows = _variant_forward(policy, objective, batch, cat, pad_token_id)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=attn).logits

    pol = sequence_logprobs(policy_logits, ids, resp)
    ref = sequence_logprobs(ref_logits, ids, resp)
    margin = dpo_margin(pol[:B], pol[B:], ref[:B], ref[B:], beta)
    base_margin = margin
    pair_beta = objective.pair_beta(batch) if objective is not None else None
    if pair_beta is not None:  # SP2DPO: beta_i in the loss only
        from ..objectives.sp2dpo import per_pair_dpo_margin

        margin = per_pair_dpo_margin(pol[:B], pol[B:], ref[:B], ref[B:], pair_beta.to(pol.dtype))

    z = confidence = None
    if refine:
        bar = extrapolated_sequence_logprobs(policy_logits.detach(), ref_logits, ids, resp, lam, chunk_size)
        confidence = decoupled_confidence(bar[:B], bar[B:], ref[:B], ref[B:], beta)
        z = window.flags(confidence, step, total_steps)
        losses = refined_dpo_loss(margin, z, alpha)
    else:
        losses = dpo_loss(margin)
    variant_stats: dict[str, float] = {}
    if objective is None:
        loss = losses.mean()
    else:
        from ..objectives.logprobs import response_lengths
        from ..variants.objective import StepContext

        lengths = response_lengths(resp)
        loss, variant_stats = objective.loss(StepContext(
            losses=losses, margin=margin, base_margin=base_margin, policy_chosen=pol[:B], policy_rejected=pol[B:],
            ref_chosen=ref[:B], ref_rejected=ref[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
            beta=beta, step=step, total_steps=total_steps, batch=batch, z=z, **variant_rows,
        ))

    with torch.no_grad():
        m = margin.detach()
        chosen_r = beta * (pol[:B].detach() - ref[:B])
        rejected_r = beta * (pol[B:].detach() - ref[B:])
        stats = {
            "loss": float(loss.detach()),
            "margin": float(m.mean()),
            "reward_accuracy": float((m > 0).float().mean()),
            "chosen_reward": float(chosen_r.mean()),
            "rejected_reward": float(rejected_r.mean()),
            "z_rate": float(z.float().mean()) if z is not None else 0.0,
            "tau": float(window.tau) if (refine and window.tau is not None) else math.nan,
            "confidence": float(confidence.mean()) if confidence is not None else math.nan,
            **variant_stats,
        }
    return PreferenceStepOutput(loss=loss, stats=stats, z=z, confidence=confidence)


def _variant_forward(policy, objective, batch: dict, cat: dict, pad_token_id: int):
    """The variant's single policy forward: the stacked pairs plus any extra rows (SSPO's
    unpaired responses), with hidden states when asked. Returns the pairs' logits [2B, T]
    and the StepContext fields of the extra rows and pooled hidden states."""
    from ..objectives.logprobs import response_lengths
    from ..objectives.sppo import mean_pool

    ids, attn, resp = cat["input_ids"], cat["attention_mask"], cat["response_mask"]
    n, T = ids.shape
    extra = objective.extra_rows(batch)
    if extra is not None:
        ids_all, attn_all, resp_all = (stack_right_padded([cat[f], extra[f]], pad_token_id if f == "input_ids" else 0)
                                       for f in FIELDS)
    else:
        ids_all, attn_all, resp_all = ids, attn, resp
    if objective.needs_hidden_states:
        out = policy(input_ids=ids_all, attention_mask=attn_all, output_hidden_states=True)
    else:
        out = policy(input_ids=ids_all, attention_mask=attn_all)
    logits = out.logits
    fields: dict = {}
    if extra is not None:
        fields["extra_logps"] = sequence_logprobs(logits[n:], ids_all[n:], resp_all[n:])
        fields["extra_lengths"] = response_lengths(resp_all[n:])
    if objective.needs_hidden_states:
        B = n // 2
        pooled = mean_pool(out.hidden_states[-1][:n, :T], resp.bool())
        fields["hidden_chosen"], fields["hidden_rejected"] = pooled[:B], pooled[B:]
    return logits[:n, :T], fields
