"""Win rates against a baseline, the length-controlled win rate, and judge accuracy.

All functions take paired 1-D sequences (lists, numpy arrays or tensors), refuse NaN and
length mismatches, and return Python floats. Ties count half.

Length-controlled (LC) win rate, AlpacaEval-LC style (simplified: no per-instruction
term): fit the logistic regression

    P(policy beats baseline | pair i) = sigmoid(a + b * x_i),
    x_i = (len_policy_i - len_baseline_i) / s,   s = std of the length differences

to the outcomes y_i (win 1, loss 0, tie 1/2 = half weight on each outcome) by Newton's
method in float64, with a tiny ridge on b only (keeps b finite when length separates the
outcomes perfectly, and picks b = 0 when the differences are all identical). x is scaled
but NOT centred, so x = 0 still means "same length": the LC win rate is sigmoid(a), the
predicted win rate of a pair whose responses have equal length. AlpacaEval additionally
squashes x with tanh and models instruction difficulty; neither is done here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "gold_win_rate",
    "pairwise_outcomes",
    "length_controlled_win_rate",
    "fit_length_controlled",
    "LCFit",
    "implicit_reward_accuracy",
    "mean_length",
]


def _as_1d(name: str, values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(arr))[:10].tolist()}")
    return arr


def _paired(**named) -> list[np.ndarray]:
    arrays = [_as_1d(k, v) for k, v in named.items()]
    sizes = {k: a.shape[0] for k, a in zip(named, arrays)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"length mismatch: {sizes}")
    if arrays[0].shape[0] == 0:
        raise ValueError(f"{', '.join(named)} are empty")
    return arrays


def pairwise_outcomes(policy_scores, baseline_scores) -> np.ndarray:
    """Per pair: 1.0 policy wins, 0.0 loses, 0.5 tie (float64 array)."""
    p, b = _paired(policy_scores=policy_scores, baseline_scores=baseline_scores)
    return np.where(p > b, 1.0, np.where(p < b, 0.0, 0.5))


def gold_win_rate(policy_scores, baseline_scores) -> float:
    """Fraction of pairs where the policy's gold score beats the baseline's (ties half)."""
    return float(pairwise_outcomes(policy_scores, baseline_scores).mean())


def implicit_reward_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of gold pairs where the judge's reward ranks chosen above rejected (ties half)."""
    c, r = _paired(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return float(np.where(c > r, 1.0, np.where(c < r, 0.0, 0.5)).mean())


def mean_length(lengths_or_sequences) -> float:
    """Mean of integer lengths, or of len() of each sequence (e.g. response token lists)."""
    items = list(lengths_or_sequences) if not hasattr(lengths_or_sequences, "detach") else lengths_or_sequences.tolist()
    if not items:
        raise ValueError("mean_length of an empty collection")
    vals = [len(x) if hasattr(x, "__len__") and not isinstance(x, (int, float)) else float(x) for x in items]
    return float(np.mean(np.asarray(vals, dtype=np.float64)))


@dataclass(frozen=True)
class LCFit:
    win_rate: float  # sigmoid(intercept): the LC win rate
    intercept: float
    slope: float  # per standardised unit of length difference
    scale: float  # s, the std of the length differences (1.0 when they are all equal)
    raw_win_rate: float
    n: int
    iterations: int
    converged: bool


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def _objective(theta, X, y, ridge) -> float:
    z = X @ theta
    # mean soft-label cross-entropy: log(1 + e^z) - y z, stably
    nll = np.logaddexp(0.0, z) - y * z
    return float(nll.mean() + 0.5 * ridge * theta[1] ** 2)


def fit_length_controlled(
    policy_scores,
    baseline_scores,
    policy_lengths,
    baseline_lengths,
    ridge: float = 1e-4,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LCFit:
    """The full LC fit (see the module docstring); `ridge` penalises the slope only."""
    y = pairwise_outcomes(policy_scores, baseline_scores)
    lp, lb = _paired(policy_lengths=policy_lengths, baseline_lengths=baseline_lengths)
    if lp.shape[0] != y.shape[0]:
        raise ValueError(f"length mismatch: {y.shape[0]} score pairs but {lp.shape[0]} length pairs")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    n = y.shape[0]
    raw = float(y.mean())
    d = lp - lb
    scale = float(d.std())
    if not scale > 0:
        scale = 1.0
    X = np.stack([np.ones(n), d / scale], axis=1)
    if raw in (0.0, 1.0):  # all losses / all wins: the MLE intercept is -inf / +inf
        return LCFit(raw, math.copysign(math.inf, raw - 0.5), 0.0, scale, raw, n, 0, True)
    theta = np.array([math.log(raw / (1.0 - raw)), 0.0])
    penalty = np.diag([0.0, ridge])
    converged, it = False, 0
    f = _objective(theta, X, y, ridge)
    for it in range(1, max_iter + 1):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) / n + penalty @ theta
        w = p * (1.0 - p)
        hess = (X * w[:, None]).T @ X / n + penalty
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        t = 1.0
        while True:  # backtracking: Newton on a convex objective, halve if it overshoots
            cand = theta - t * step
            fc = _objective(cand, X, y, ridge)
            if fc <= f + 1e-15 or t < 1e-8:
                break
            t *= 0.5
        theta, f = cand, fc
        if np.max(np.abs(t * step)) < tol or np.max(np.abs(grad)) < tol:
            converged = True
            break
    a, b = float(theta[0]), float(theta[1])
    return LCFit(float(_sigmoid(np.array(a))), a, b, scale, raw, n, it, converged)


def length_controlled_win_rate(policy_scores, baseline_scores, policy_lengths, baseline_lengths) -> float:
    """sigmoid(intercept) of the length-difference logistic fit: the win rate at equal length."""
    return fit_length_controlled(policy_scores, baseline_scores, policy_lengths, baseline_lengths).win_rate
