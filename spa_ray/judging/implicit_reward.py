"""Direct preference judgment with the policy's implicit reward (SPA Eq. 7-8, 13).

r(x, y) = beta * (log pi_{t-1}(y|x) - log pi_ref(y|x))   (pi_ref = pi_init by default)
p(y1 > y2 | x) = sigma(r(x, y1) - r(x, y2));   (y_w, y_l) = (y1, y2) if p > 0.5 else (y2, y1)

Options: no reference (r = beta * log pi_{t-1}(y|x), the raw likelihood judge) and the
length penalty r - a*|y| (Eq. 13) against the judge's bias toward long answers.
A judge produces labels, never gradients: every output here is detached.

Numerics: rewards are computed in float64, so only genuinely equal scores (identical
responses, or identical log-probs) tie; a tie is decided on r1 == r2 exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..objectives._checks import check_1d, check_floating, check_non_negative, check_positive, check_same_shape, rows


@torch.no_grad()
def implicit_reward(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    beta: float,
    response_lengths: torch.Tensor | None = None,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """r [N] float64, detached: beta*(policy - ref) (or beta*policy if ref is None) - length_penalty*|y|."""
    beta = check_positive("beta", beta)
    a = check_non_negative("length_penalty", length_penalty)
    check_1d("policy_logps", policy_logps)
    check_floating(policy_logps=policy_logps)
    r = policy_logps.detach().to(torch.float64)
    if ref_logps is not None:
        check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
        check_floating(ref_logps=ref_logps)
        r = r - ref_logps.detach().to(device=r.device, dtype=torch.float64)
    r = beta * r
    if a > 0.0:
        if response_lengths is None:
            raise ValueError("response_lengths is required when length_penalty > 0")
        check_same_shape(policy_logps=policy_logps, response_lengths=response_lengths)
        if bool((response_lengths < 0).any()):
            raise ValueError(f"response_lengths must be >= 0; negative in rows {rows(response_lengths < 0)}")
        r = r - a * response_lengths.detach().to(device=r.device, dtype=torch.float64)
    elif response_lengths is not None:
        check_same_shape(policy_logps=policy_logps, response_lengths=response_lengths)
    return r


class PairLabels(NamedTuple):
    """Labels for N pairs (y1, y2).

    first_is_chosen: bool [N]; True -> (y_w, y_l) = (y1, y2), False -> (y2, y1).
        False on ties, which carry no label (check `is_tie`).
    probability: float64 [N]; p(y1 > y2 | x) = sigma(r1 - r2), the Eq. 8 probability of
        the first response of the pair, as given (NOT reordered by the label).
        Exactly 0.5 on ties. `chosen_probability` gives p(y_w > y_l) instead.
    is_tie: bool [N]; r1 == r2 exactly: drop the pair and count it (`num_ties`).
    """

    first_is_chosen: torch.Tensor
    probability: torch.Tensor
    is_tie: torch.Tensor

    @property
    def chosen_probability(self) -> torch.Tensor:
        """p(y_w > y_l | x) = max(p, 1 - p) >= 0.5 (0.5 on ties)."""
        return torch.where(self.first_is_chosen, self.probability, 1.0 - self.probability)

    @property
    def num_ties(self) -> int:
        return int(self.is_tie.sum())

    @property
    def keep(self) -> torch.Tensor:
        """Pairs that carry a preference (not ties)."""
        return ~self.is_tie


@torch.no_grad()
def label_pairs(reward_1: torch.Tensor, reward_2: torch.Tensor) -> PairLabels:
    """Eq. 8: y1 is chosen iff r1 > r2 (p > 0.5); r1 == r2 is a tie (no pair, counted).

    Decided on the rewards, not on the rounded probability: for 0 < |r1 - r2| < ~1e-16
    sigma rounds to 0.5 but the sign still gives the label. Non-finite rewards raise.
    """
    check_same_shape(reward_1=reward_1, reward_2=reward_2)
    check_1d("reward_1", reward_1)
    check_floating(reward_1=reward_1, reward_2=reward_2)
    r1 = reward_1.detach().to(torch.float64)
    r2 = reward_2.detach().to(device=r1.device, dtype=torch.float64)
    bad = ~(torch.isfinite(r1) & torch.isfinite(r2))
    if bool(bad.any()):
        raise ValueError(f"rewards must be finite; NaN/inf in rows {rows(bad)}")
    is_tie = r1 == r2
    first_is_chosen = r1 > r2
    probability = torch.where(is_tie, torch.full_like(r1, 0.5), torch.sigmoid(r1 - r2))
    return PairLabels(first_is_chosen, probability, is_tie)
