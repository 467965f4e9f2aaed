"""Which self-labelled pairs an iteration trains on (issue #21). Pure math: no Ray, no I/O.

SPA labels the first two samples of each prompt and trains on every pair that is not a
tie. On the embedded task that yields labels that agree with gold on only ~0.6-0.7 of
the pairs, while the pairs the judge is sure of (a large |implicit-reward margin|) agree
far more often. So, by configuration:

- **pair rule**: ``first_two`` (the paper) or ``max_min``: the sample with the highest
  implicit reward against the one with the lowest, of n samples (as DICE does);
- **confidence filter**: keep an iteration's pairs whose margin is at least
  ``min_margin`` and among the top ``keep_fraction`` by margin (or, as a control that
  trains on as many pairs without the judge's confidence, a random ``keep_fraction``);
- **seed replay**: gold seed pairs mixed into each iteration's table, a ``share`` of it;
- **audit sample**: ``m`` random judged pairs held out of training for an external label.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["PAIR_RULES", "KEEP_BY", "scored_sample_pairs", "pick_pair", "confident_mask", "replay_indices", "audit_indices",
           "wilson_interval"]

PAIR_RULES = ("first_two", "max_min")
KEEP_BY = ("margin", "random")


def scored_sample_pairs(n: int, rule: str) -> list[tuple[int, int]]:
    """The (sample, sample) index pairs the judge scores for one prompt of ``n`` samples:
    each judge row scores two responses, so ``max_min`` covers all n in ceil(n/2) rows
    (an odd last sample is paired with sample 0, scored twice)."""
    _check_rule(rule)
    if n < 2:
        raise ValueError(f"a pair needs >= 2 samples per prompt, got {n}")
    if rule == "first_two":
        return [(0, 1)]
    return [(i, i + 1 if i + 1 < n else 0) for i in range(0, n, 2)]


def pick_pair(rewards: Sequence[float], rule: str) -> tuple[int, int] | None:
    """(chosen, rejected) sample indices by the rule, or None for a tie (no preference).

    ``first_two``: samples 0 and 1, the higher reward chosen (Eq. 8). ``max_min``: the
    first sample of highest reward against the first of lowest. Ties are exact equality,
    as in ``label_pairs``."""
    _check_rule(rule)
    if len(rewards) < 2:
        raise ValueError(f"a pair needs >= 2 rewards, got {len(rewards)}")
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError(f"rewards must be finite, got {list(rewards)}")
    if rule == "first_two":
        a, b = 0, 1
    else:
        a = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        b = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if rewards[a] == rewards[b]:
        return None
    return (a, b) if rewards[a] > rewards[b] else (b, a)


def confident_mask(margins: Sequence[float], keep_fraction: float = 1.0, min_margin: float = 0.0,
                   keep_by: str = "margin", seed: int = 0) -> list[bool]:
    """Which pairs to keep: margin >= ``min_margin``, and among the ``round(keep_fraction * N)``
    largest margins of all N pairs (equal margins: the earlier pair first, so the mask is
    the same on every run). ``keep_fraction=1, min_margin=0`` keeps everything (the paper).

    ``keep_by="random"``: the same number of pairs drawn at random (deterministic in
    ``seed``, independent of the audit's draw from the same seed) instead of the largest
    margins -- the control that tells the filter's label quality apart from its training
    on fewer pairs."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if keep_by not in KEEP_BY:
        raise ValueError(f"keep_by must be one of {KEEP_BY}, got {keep_by!r}")
    if any(not (m >= 0) for m in margins):
        raise ValueError("margins must be >= 0 and not NaN (|r_w - r_l|)")
    count = round(keep_fraction * len(margins))
    if keep_by == "margin":
        top = set(sorted(range(len(margins)), key=lambda i: (-margins[i], i))[:count])
    else:
        top = set(random.Random(f"keep_by=random:{seed}").sample(range(len(margins)), count))
    return [i in top and margins[i] >= min_margin for i in range(len(margins))]


def replay_indices(num_seed: int, num_self: int, share: float, seed: int) -> list[int]:
    """Seed-pair indices to mix into an iteration's table so that they are ``share`` of it
    (``round(share / (1 - share) * num_self)`` pairs), drawn without replacement and, past
    ``num_seed``, from a fresh permutation again; deterministic in ``seed``."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must be in [0, 1), got {share}")
    count = round(share / (1.0 - share) * num_self) if share else 0
    if count and num_seed <= 0:
        raise ValueError("seed replay asks for seed pairs, but the seed set is empty")
    rng = random.Random(seed)
    picked: list[int] = []
    while len(picked) < count:
        perm = list(range(num_seed))
        rng.shuffle(perm)
        picked.extend(perm[:count - len(picked)])
    return picked


def audit_indices(candidates: Sequence[int], m: int, seed: int) -> list[int]:
    """``m`` of ``candidates`` drawn at random (all of them when there are fewer), sorted."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    candidates = list(candidates)
    if m >= len(candidates):
        return sorted(candidates)
    return sorted(random.Random(seed).sample(candidates, m))


def wilson_interval(agree: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``agree / n`` (95% at z = 1.96); (0, 1) for n = 0."""
    if not 0 <= agree <= n:
        raise ValueError(f"need 0 <= agree <= n, got {agree} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_rule(rule: str) -> None:
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
