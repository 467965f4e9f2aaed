"""Per-step objectives of the variants: what ``preference_step`` calls when a variant is set.

Pure torch (no Ray, no I/O), built from the formulas in ``spa_ray/objectives``. Each
objective plugs into the step at the points the loop already has:

- ``pair_beta(batch)``: a per-pair beta [B] for the loss margin (SP2DPO), or None;
- ``extra_rows(batch)``: rows appended to the ONE policy forward (SSPO's unpaired responses);
- ``needs_hidden_states``: ask the policy forward for hidden states (S-SPPO's repulsion);
- ``loss(ctx)``: the scalar loss from the step's tensors (per-pair weight, loss form).

Per-pair inputs come in the batch as ``pair_<column>`` tensors [B] (the trainer copies
the pairs table's columns), unpaired rows as ``unpaired_{input_ids,attention_mask,response_mask}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from spa_ray.objectives import sppo as sppo_math
from spa_ray.objectives import sspo as sspo_math
from spa_ray.objectives.wdro import wdro_pair_weights


@dataclass
class StepContext:
    """What one preference step has computed, for a variant's loss."""

    losses: torch.Tensor                 # [B] per-pair DPO / refined-DPO loss (the SPA loss form)
    margin: torch.Tensor                 # [B] margin used in `losses` (per-pair beta when set)
    base_margin: torch.Tensor            # [B] margin with the global beta (judge/noise-detection scale)
    policy_chosen: torch.Tensor          # [B] log pi_theta(y_w|x), with grad
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor             # [B] log pi_ref, no grad
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor         # [B] |y_w| in tokens
    rejected_lengths: torch.Tensor
    beta: float
    step: int
    total_steps: int
    batch: dict
    z: torch.Tensor | None = None
    hidden_chosen: torch.Tensor | None = None    # [B, H] mean-pooled over response tokens
    hidden_rejected: torch.Tensor | None = None
    extra_logps: torch.Tensor | None = None      # [U] log pi_theta of the extra rows
    extra_lengths: torch.Tensor | None = None


class VariantObjective:
    """SPA's own loss: mean of the per-pair losses. Subclasses change one plug-in point."""

    name = "spa"
    needs_hidden_states = False

    def pair_beta(self, batch: dict) -> torch.Tensor | None:
        return None

    def extra_rows(self, batch: dict) -> dict[str, torch.Tensor] | None:
        return None

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        return ctx.losses.mean(), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _column(batch: dict, name: str) -> torch.Tensor:
    key = f"pair_{name}"
    if key not in batch:
        raise ValueError(f"batch has no per-pair column {key!r} (the pairs table needs a {name!r} column)")
    return batch[key]


class SP2DPOObjective(VariantObjective):
    """Per-pair beta_i (pairs-table column ``beta``) in the loss margin; stats of beta."""

    name = "sp2dpo"

    def pair_beta(self, batch: dict) -> torch.Tensor:
        return _column(batch, "beta")

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        beta = _column(ctx.batch, "beta")
        return ctx.losses.mean(), {"beta_mean": float(beta.mean()), "beta_min": float(beta.min())}


class WDROObjective(VariantObjective):
    """Per-pair worst-case weights from the margins (global beta), SPA's flagged pairs excluded."""

    name = "wdro_dpo"

    def __init__(self, xi_min: float = 0.05, eps_fraction: float = 0.1, weight_cap: float = 5.0,
                 exclude_noisy: bool = True):
        self.xi_min, self.eps_fraction, self.weight_cap = xi_min, eps_fraction, weight_cap
        self.exclude_noisy = exclude_noisy

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        eligible = None
        if self.exclude_noisy and ctx.z is not None:
            eligible = ctx.z.detach() == 0
        w, stats = wdro_pair_weights(
            ctx.base_margin, xi_min=self.xi_min, eps_fraction=self.eps_fraction, cap=self.weight_cap, eligible=eligible
        )
        return (w.to(ctx.losses.dtype) * ctx.losses).mean(), stats


class SSPOObjective(VariantObjective):
    """Paired loss plus pseudo-labelled unpaired responses, mixed by the g_t schedule."""

    name = "sspo"

    def __init__(self, beta: float = 2.0, ema_momentum: float = 0.9, decay: float = 0.001, grid_size: int = 512,
                 n_paired: int = 1, n_unpaired: int = 0, gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.beta, self.decay = beta, decay
        self.n_paired, self.n_unpaired = n_paired, n_unpaired
        self.threshold = sspo_math.ThresholdEMA(ema_momentum, grid_size)
        self.gather = gather

    def extra_rows(self, batch: dict) -> dict[str, torch.Tensor] | None:
        if "unpaired_input_ids" not in batch:
            return None
        return {f: batch[f"unpaired_{f}"] for f in ("input_ids", "attention_mask", "response_mask")}

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            r_w = sspo_math.simpo_reward(ctx.policy_chosen.detach(), ctx.chosen_lengths, self.beta)
            r_l = sspo_math.simpo_reward(ctx.policy_rejected.detach(), ctx.rejected_lengths, self.beta)
            if self.gather is not None:  # a collective: every rank calls it at every micro-step
                r_w, r_l = self.gather(r_w), self.gather(r_l)
            delta = self.threshold.update(r_w, r_l)
        g = sspo_math.paired_weight(ctx.step, self.n_paired, self.n_unpaired, self.decay)
        if ctx.extra_logps is not None and ctx.extra_logps.numel():
            r_u = sspo_math.simpo_reward(ctx.extra_logps, ctx.extra_lengths, self.beta)
            unpaired = sspo_math.unpaired_loss(r_u, delta, self.beta)
            above = float((r_u.detach() > delta).float().mean())
        else:
            unpaired = ctx.losses.new_zeros(0)
            above = math.nan
        loss = sspo_math.sspo_loss(ctx.losses, unpaired, g)
        return loss, {"sspo_delta": float(delta), "sspo_g": float(g), "sspo_unpaired_above": above}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.threshold.load_state_dict(state["threshold"])


class SSPPOObjective(VariantObjective):
    """SPPO squared loss on log-ratios, targets from the judge pulled to 1/2 by the semantic gate."""

    name = "s_sppo"

    def __init__(self, gate_low: float = 0.8, gate_high: float = 0.98, repulsion_weight: float = 0.05,
                 repulsion_margin: float = 0.5):
        self.gate_low, self.gate_high = gate_low, gate_high
        self.repulsion_weight, self.repulsion_margin = repulsion_weight, repulsion_margin

    @property
    def needs_hidden_states(self) -> bool:  # type: ignore[override]
        return self.repulsion_weight > 0

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        p = _column(ctx.batch, "win_prob").to(ctx.policy_chosen.dtype)
        sim = _column(ctx.batch, "similarity").to(p.dtype)
        gate = torch.where(torch.isnan(sim), torch.zeros_like(sim),
                           sppo_math.semantic_gate(torch.nan_to_num(sim), self.gate_low, self.gate_high))
        P_w, P_l = sppo_math.win_probabilities(p)
        t_w, t_l = sppo_math.calibrate_targets(P_w, gate), sppo_math.calibrate_targets(P_l, gate)
        per_pair = sppo_math.sppo_loss(ctx.policy_chosen, ctx.policy_rejected, ctx.ref_chosen, ctx.ref_rejected,
                                       t_w, t_l, ctx.beta)
        loss = per_pair.mean()
        repulsion = 0.0
        if self.repulsion_weight > 0 and ctx.hidden_chosen is not None:
            rep = sppo_math.latent_repulsion(ctx.hidden_chosen, ctx.hidden_rejected, self.repulsion_weight,
                                             self.repulsion_margin)
            loss = loss + rep.to(loss.dtype)
            repulsion = float(rep.detach())
        return loss, {"sppo_gate_mean": float(gate.mean()), "sppo_repulsion": repulsion}


def build_objective(variant: dict[str, Any], *, n_paired: int = 1, n_unpaired: int = 0,
                    gather: Callable | None = None) -> VariantObjective:
    """The objective for a stage's resolved ``variant`` dict (``TrainStageSpec.variant``)."""
    name = variant.get("name", "spa")
    if name == "spa":
        return VariantObjective()
    if name == "sp2dpo":
        return SP2DPOObjective()
    if name == "wdro_dpo":
        return WDROObjective(variant["xi_min"], variant["eps_fraction"], variant["weight_cap"], variant["exclude_noisy"])
    if name == "sspo":
        return SSPOObjective(variant["beta"], variant["ema_momentum"], variant["decay"], variant["grid_size"],
                             n_paired=n_paired, n_unpaired=n_unpaired, gather=gather)
    if name == "s_sppo":
        return SSPPOObjective(variant["gate_low"], variant["gate_high"], variant["repulsion_weight"],
                              variant["repulsion_margin"])
    raise ValueError(f"unknown variant {name!r}")


__all__ = [
    "SP2DPOObjective",
    "SSPOObjective",
    "SSPPOObjective",
    "StepContext",
    "VariantObjective",
    "WDROObjective",
    "build_objective",
]
