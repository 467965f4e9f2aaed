"""SSPO: semi-supervised preference optimisation (arXiv 2511.00040).

A few paired labels plus many single, unpaired responses. The unpaired ones are
pseudo-labelled against a reward threshold delta that minimises the Bayes risk of
classifying "winning" vs "losing" responses, estimated from the paired data:

    r(x, y)  = beta / |y| * log pi(y|x)                     (SimPO-form reward)
    F_w, F_l = CDFs of Gaussian KDEs (Scott's rule) fitted to winning / losing rewards
    delta    = argmin_grid 0.5*F_w(delta) + 0.5*(1 - F_l(delta))
    d_u      = beta * (r_u - delta)
    L_u      = 0.5 * -log sigma(d_u)   if d_u > 0   else   0.5 * -log sigma(-d_u)
    L        = g_t * L_pair + (1 - g_t) * L_unpaired,  g_t = max(g_min, exp(-rate*step)),
               g_min = n_paired / (n_paired + n_unpaired)

Early on the paired loss dominates (the reward distributions still overlap); later the
unpaired pool takes over. delta is smoothed over steps with an EMA (momentum 0.9: OUR
DEFAULT, the paper's value is not public) and never carries gradient.
Pure torch, no Ray, no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_1d, check_positive, check_same_shape, check_unit_interval


def simpo_reward(logps: torch.Tensor, lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * log pi(y|x) / |y|: length-normalised, needs no reference model."""
    beta = check_positive("beta", beta)
    check_same_shape(logps=logps, lengths=lengths)
    if bool((lengths <= 0).any()):
        raise ValueError(f"lengths must be > 0, got {lengths.tolist()}")
    return beta * logps / lengths.to(logps.dtype)


def scott_bandwidth(samples: torch.Tensor) -> float:
    """h = std(ddof=1) * n^(-1/5): Scott's rule in one dimension (scipy's gaussian_kde default).

    Fewer than two samples or no spread give no std; then h = 1e-6 * (1 + |mean|), a
    near-point mass, so the threshold stays defined (a batch of identical rewards).
    """
    check_1d("samples", samples)
    n = samples.numel()
    if n == 0:
        raise ValueError("samples must hold at least one value")
    x = samples.detach().double()
    std = float(x.std(unbiased=True)) if n > 1 else 0.0
    h = std * n ** (-0.2)
    if not math.isfinite(h) or h <= 0:
        h = 1e-6 * (1.0 + abs(float(x.mean())))
    return h


def kde_cdf(points: torch.Tensor, samples: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """F(points) of a Gaussian KDE on ``samples``: mean_j Phi((x - s_j) / h), float64."""
    h = scott_bandwidth(samples) if bandwidth is None else check_positive("bandwidth", bandwidth)
    x = points.detach().double().reshape(-1, 1)
    s = samples.detach().double().reshape(1, -1)
    z = (x - s) / h
    return (0.5 * torch.erfc(-z / math.sqrt(2.0))).mean(dim=1).reshape(points.shape)


def bayes_risk(delta: torch.Tensor, win_rewards: torch.Tensor, lose_rewards: torch.Tensor) -> torch.Tensor:
    """0.5*F_w(delta) + 0.5*(1 - F_l(delta)): equal priors, a winner below delta or a loser above it is an error."""
    return 0.5 * kde_cdf(delta, win_rewards) + 0.5 * (1.0 - kde_cdf(delta, lose_rewards))


def bayes_threshold(win_rewards: torch.Tensor, lose_rewards: torch.Tensor, grid_size: int = 512) -> float:
    """delta minimising the estimated Bayes risk on an even grid spanning both KDEs (+-4 bandwidths)."""
    check_1d("win_rewards", win_rewards)
    check_1d("lose_rewards", lose_rewards)
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    w, lo_ = win_rewards.detach().double(), lose_rewards.detach().double()
    pad = 4.0 * max(scott_bandwidth(w), scott_bandwidth(lo_))
    both = torch.cat([w, lo_])
    grid = torch.linspace(float(both.min()) - pad, float(both.max()) + pad, grid_size, dtype=torch.float64)
    risk = bayes_risk(grid, w, lo_)
    return float(grid[int(torch.argmin(risk))])


def ema_update(previous: float | None, value: float, momentum: float = 0.9) -> float:
    """momentum*previous + (1-momentum)*value; the first value is taken as is."""
    momentum = check_unit_interval("momentum", momentum)
    return float(value) if previous is None else momentum * float(previous) + (1.0 - momentum) * float(value)


def unpaired_loss(rewards: torch.Tensor, delta: float, beta: float) -> torch.Tensor:
    """Per response [U]: d = beta*(r - delta); 0.5*(-log sigma(d)) if d > 0 else 0.5*(-log sigma(-d))."""
    check_1d("rewards", rewards)
    beta = check_positive("beta", beta)
    d = beta * (rewards - float(delta))
    return torch.where(d > 0, 0.5 * -F.logsigmoid(d), 0.5 * -F.logsigmoid(-d))


def paired_weight(step: int, n_paired: int, n_unpaired: int, rate: float = 0.001) -> float:
    """g_t = max(g_min, exp(-rate*step)), g_min = n_paired / (n_paired + n_unpaired)."""
    if n_paired < 1 or n_unpaired < 0:
        raise ValueError(f"n_paired must be >= 1 and n_unpaired >= 0, got {n_paired}, {n_unpaired}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    g_min = n_paired / (n_paired + n_unpaired)
    return max(g_min, math.exp(-rate * step))


def sspo_loss(pair_loss: torch.Tensor, unpaired: torch.Tensor, g: float) -> torch.Tensor:
    """g*mean(pair losses) + (1-g)*mean(unpaired losses), scalar (unpaired may be empty)."""
    check_unit_interval("g", g)
    total = g * pair_loss.mean()
    if unpaired.numel():
        total = total + (1.0 - g) * unpaired.mean()
    return total


class ThresholdEMA:
    """delta across steps: each step's Bayes threshold folded in with an EMA (detached)."""

    def __init__(self, momentum: float = 0.9, grid_size: int = 512):
        self.momentum = check_unit_interval("momentum", momentum)
        self.grid_size = int(grid_size)
        self.value: float | None = None

    def update(self, win_rewards: torch.Tensor, lose_rewards: torch.Tensor) -> float:
        self.value = ema_update(self.value, bayes_threshold(win_rewards, lose_rewards, self.grid_size), self.momentum)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "momentum": self.momentum, "grid_size": self.grid_size}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


__all__ = [
    "ThresholdEMA",
    "bayes_risk",
    "bayes_threshold",
    "ema_update",
    "kde_cdf",
    "paired_weight",
    "scott_bandwidth",
    "simpo_reward",
    "sspo_loss",
    "unpaired_loss",
]
