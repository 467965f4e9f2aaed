"""WDRO-DPO: Wasserstein worst-case reweighting of DPO pairs (seed thesis proposal).

The proposal (shared/papers/wdro-dpo-proposal-zh.md, Eq. 2-2 to 2-6) maximises the DPO
loss over distributions within Wasserstein distance ``eps`` of the empirical distribution
of each pair's confidence ``xi = sigma(m)``. For the loss ``l(xi) = -log xi``, convex and
decreasing on ``[xi_min, 1]``, that worst case has a closed form: transport is cheapest
per unit of loss gained from the least confident pair straight down to ``xi_min``, so a
greedy pass in ascending ``xi`` solves the Esfahani-Kuhn linear program (checked against
``scipy.optimize.linprog`` in tests/test_variants_wdro.py). The moved mass keeps following
its pair's gradient, scaled by ``xi_i / xi_min`` (Eq. 2-6), which is the per-pair weight.

Our defaults (the proposal publishes none): ``xi_min = 0.05``, ``eps = 0.1 * mean(xi -
xi_min)``, weights capped at 5, and SPA's noise-flagged pairs (z = 1) left out of the
reweighting: WDRO upweights exactly the least confident pairs, which SPA treats as noise.
Pure torch, no Ray, no I/O.
"""

from __future__ import annotations

import torch

from ._checks import check_1d, check_non_negative, check_positive, check_same_shape, check_unit_interval


def wdro_confidence(margin: torch.Tensor, xi_min: float = 0.05) -> torch.Tensor:
    """xi_i = clip(sigma(m_i), xi_min, 1), detached: the point each pair's mass sits at.

    ``margin`` is the DPO margin with beta already applied (``objectives.dpo.dpo_margin``).
    """
    check_1d("margin", margin)
    xi_min = check_unit_interval("xi_min", xi_min)
    if xi_min <= 0:
        raise ValueError(f"xi_min must be in (0, 1), got {xi_min}")
    return torch.sigmoid(margin.detach()).clamp(min=xi_min, max=1.0)


def wdro_budget(xi: torch.Tensor, xi_min: float, eps_fraction: float, eligible: torch.Tensor) -> float:
    """B = N*eps with eps = eps_fraction * mean(xi - xi_min), both over eligible pairs.

    Scaling eps with the batch's own mean distance to xi_min makes one setting fit every
    stage of training (margins grow as training goes on). Our default, not published.
    """
    check_non_negative("eps_fraction", eps_fraction)
    gaps = (xi - xi_min)[eligible]
    if gaps.numel() == 0:
        return 0.0
    return float(eps_fraction * gaps.sum())


def greedy_transport_fractions(
    xi: torch.Tensor, xi_min: float, budget: float, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """f_i: fraction of pair i's mass moved to xi_min by the worst case with budget B.

    Ascending xi: f_i = min(1, B / (xi_i - xi_min)); B -= f_i*(xi_i - xi_min); stop at B = 0.
    Pairs not ``eligible`` keep f = 0. A pair already at xi_min has nothing to move (f = 0).
    """
    check_1d("xi", xi)
    check_non_negative("budget", budget)
    if eligible is None:
        eligible = torch.ones_like(xi, dtype=torch.bool)
    check_same_shape(xi=xi, eligible=eligible)
    f = torch.zeros_like(xi, dtype=torch.float64)
    remaining = float(budget)
    xs = xi.detach().double().tolist()
    ok = eligible.tolist()
    for i in sorted(range(len(xs)), key=lambda k: xs[k]):
        if remaining <= 0:
            break
        gap = xs[i] - xi_min
        if not ok[i] or gap <= 0:
            continue
        frac = min(1.0, remaining / gap)
        f[i] = frac
        remaining -= frac * gap
    return f.to(xi.dtype)


def wdro_weights(f: torch.Tensor, xi: torch.Tensor, xi_min: float, cap: float = 5.0) -> torch.Tensor:
    """w_i = (1 - f_i) + f_i * xi_i / xi_min, capped: the gradient scale of the worst case.

    Mass moved to xi_min contributes d(-log xi)/d theta evaluated at xi_min instead of at
    xi_i, i.e. xi_i/xi_min times the pair's own gradient (Eq. 2-6). The cap (our default 5)
    bounds one pair's influence when xi_min is small. Detached.
    """
    check_same_shape(f=f, xi=xi)
    check_positive("cap", cap)
    w = (1.0 - f) + f * xi / xi_min
    return w.detach().clamp(max=cap)


def worst_case_expected_loss(xi: torch.Tensor, f: torch.Tensor, xi_min: float) -> torch.Tensor:
    """(1/N) sum_i [(1 - f_i) * l(xi_i) + f_i * l(xi_min)] with l = -log: the LP's objective."""
    check_same_shape(xi=xi, f=f)
    lmin = -torch.log(torch.as_tensor(xi_min, dtype=xi.dtype))
    return ((1.0 - f) * (-torch.log(xi)) + f * lmin).mean()


def wdro_pair_weights(
    margin: torch.Tensor,
    *,
    xi_min: float = 0.05,
    eps_fraction: float = 0.1,
    cap: float = 5.0,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair detached weights w [B] for one batch, and stats for the log.

    ``eligible``: bool [B]; pairs outside it get w = 1 and no share of the budget (SPA's
    noise-flagged pairs by default). Use as ``(w * per_pair_loss).mean()``.
    """
    xi = wdro_confidence(margin, xi_min)
    if eligible is None:
        eligible = torch.ones_like(xi, dtype=torch.bool)
    eligible = eligible.to(torch.bool)
    budget = wdro_budget(xi, xi_min, eps_fraction, eligible)
    f = greedy_transport_fractions(xi, xi_min, budget, eligible)
    w = wdro_weights(f, xi, xi_min, cap)
    stats = {
        "wdro_weight_mean": float(w.mean()),
        "wdro_weight_max": float(w.max()),
        "wdro_moved_pairs": float((f > 0).sum()),
    }
    return w, stats


def dr_dpo_loss(per_pair_loss: torch.Tensor, b: float = 1.0) -> torch.Tensor:
    """Dr. DPO (arXiv 2407.07880), the anchor: -b * log mean_i exp(-l_i / b), scalar."""
    check_1d("per_pair_loss", per_pair_loss)
    b = check_positive("b", b)
    n = per_pair_loss.shape[0]
    return -b * (torch.logsumexp(-per_pair_loss / b, dim=0) - torch.log(torch.tensor(float(n), dtype=per_pair_loss.dtype)))


__all__ = [
    "dr_dpo_loss",
    "greedy_transport_fractions",
    "wdro_budget",
    "wdro_confidence",
    "wdro_pair_weights",
    "wdro_weights",
    "worst_case_expected_loss",
]
