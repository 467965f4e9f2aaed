"""The paper's data split: gold seed pairs D0, then prompt-only sets X_1..X_T, disjoint.

Paper (Sec. 5.1): from UltraFeedback (~60K), seed = 2K pairs (3.3% of 60K) with gold
labels; the rest split into 8K, 20K, 30K prompts for iterations 1, 2, 3. The cleaned
dataset the paper cites has ~60.9K rows, so 2+8+20+30 = 60K leaves ~0.9K over.

Our scheme (:class:`SplitConfig`), all sizes FRACTIONS so it scales to any dataset:

1. de-duplicate by prompt (keep first), shuffle with ``numpy.random.default_rng(
   shuffle_seed).permutation`` (deterministic given the input order);
2. the first ``holdout_fraction`` (default 0.015, ~0.9K of 60.9K: the paper's leftover)
   become the held-out set (pairs kept: gold labels for evaluation);
3. of the remaining pool P: iteration t takes the next ``iteration_fractions[t]`` * |P|
   prompts from the FRONT of P (defaults 8/60, 20/60, 30/60), the seed set takes the
   last ``seed_fraction`` * |P| pairs from the BACK of P (default 2/60 = 3.33%); what
   lies between (when fractions sum to < 1) is ``unused``.

With 60,917 rows the defaults give holdout 914, seed 2,000, X_1..X_3 = 8,000 / 20,001 /
30,002. Because the seed comes from the back and the iteration sets from the front,
changing ``seed_fraction`` alone (the paper's Table 3: 0.8%..10% seed with fixed prompt
sets) leaves every iteration prompt set unchanged. Sizes are rounded half-up at
cumulative boundaries, so they always sum to |P|.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .errors import DataError
from .records import PreferencePair, PromptRecord, prompt_key

__all__ = [
    "SplitConfig",
    "SplitSizes",
    "DataSplits",
    "split_sizes",
    "split_pairs",
    "assert_disjoint",
    "load_user_splits",
]

Record = Union[PreferencePair, PromptRecord]


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the split (see module docstring). ``seed_fraction`` and
    ``iteration_fractions`` are fractions of the pool left after the hold-out."""

    seed_fraction: float = 2 / 60
    iteration_fractions: tuple[float, ...] = (8 / 60, 20 / 60, 30 / 60)
    holdout_fraction: float = 0.015
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        fr = [self.seed_fraction, self.holdout_fraction, *self.iteration_fractions]
        if any(not (0.0 <= float(f) <= 1.0) or math.isnan(float(f)) for f in fr):
            raise ValueError(f"split fractions must lie in [0, 1]: {self}")
        if self.holdout_fraction >= 1.0:
            raise ValueError("holdout_fraction must be < 1")
        if self.seed_fraction + sum(self.iteration_fractions) > 1.0 + 1e-9:
            raise ValueError(
                f"seed_fraction + sum(iteration_fractions) = "
                f"{self.seed_fraction + sum(self.iteration_fractions):.6f} > 1"
            )
        object.__setattr__(self, "iteration_fractions", tuple(float(f) for f in self.iteration_fractions))


@dataclass(frozen=True)
class SplitSizes:
    holdout: int
    seed: int
    iterations: tuple[int, ...]
    unused: int

    @property
    def total(self) -> int:
        return self.holdout + self.seed + sum(self.iterations) + self.unused


def _round(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def split_sizes(n: int, config: SplitConfig = SplitConfig()) -> SplitSizes:
    """Sizes of each part for ``n`` unique prompts (they sum to ``n``)."""
    n_hold = min(_round(config.holdout_fraction * n), n)
    pool = n - n_hold
    n_seed = min(_round(config.seed_fraction * pool), pool)
    bounds, acc = [0], 0.0
    for f in config.iteration_fractions:
        acc += f
        bounds.append(min(_round(acc * pool), pool - n_seed))
    iters = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return SplitSizes(n_hold, n_seed, iters, pool - n_seed - bounds[-1])


@dataclass
class DataSplits:
    """``seed``: gold pairs D0; ``iterations[t-1]``: prompts X_t; ``holdout``: pairs (or
    prompts, for user files) kept out of training; ``unused``: left over by the fractions."""

    seed: list[PreferencePair]
    iterations: list[list[PromptRecord]]
    holdout: list[Record] = field(default_factory=list)
    unused: list[Record] = field(default_factory=list)
    duplicates_dropped: int = 0

    def named_sets(self) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {"seed": list(self.seed)}
        for t, xs in enumerate(self.iterations, start=1):
            out[f"iteration_{t}"] = list(xs)
        out["holdout"] = list(self.holdout)
        out["unused"] = list(self.unused)
        return out

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.named_sets().items()}

    def assert_disjoint(self) -> None:
        assert_disjoint(self.named_sets())


def split_pairs(pairs: Sequence[PreferencePair], config: SplitConfig = SplitConfig()) -> DataSplits:
    """Split loaded pairs as described in the module docstring (disjoint by prompt)."""
    unique: list[PreferencePair] = []
    seen: set[str] = set()
    for p in pairs:
        if p.key not in seen:
            seen.add(p.key)
            unique.append(p)
    sizes = split_sizes(len(unique), config)
    perm = np.random.default_rng(config.shuffle_seed).permutation(len(unique))
    shuffled = [unique[i] for i in perm]
    holdout = shuffled[: sizes.holdout]
    pool = shuffled[sizes.holdout :]
    iterations, start = [], 0
    for k in sizes.iterations:
        iterations.append([p.to_prompt() for p in pool[start : start + k]])
        start += k
    seed_start = len(pool) - sizes.seed
    splits = DataSplits(
        seed=pool[seed_start:],
        iterations=iterations,
        holdout=holdout,
        unused=pool[start:seed_start],
        duplicates_dropped=len(pairs) - len(unique),
    )
    splits.assert_disjoint()
    return splits


def _where(r: Record) -> str:
    return f"{r.file if r.file is not None else '<memory>'} row {r.row}"


def assert_disjoint(named_sets: Mapping[str, Sequence[Record]]) -> None:
    """Raise DataError if a prompt appears in two different sets. The error names the
    prompt, both sets, and the file/row of the second occurrence (first one in the text)."""
    first: dict[str, tuple[str, Record]] = {}
    for name, records in named_sets.items():
        local: set[str] = set()
        for r in records:
            k = prompt_key(r.prompt)
            if k in local:
                continue  # within-set duplicates are the loaders' business
            local.add(k)
            if k in first and first[k][0] != name:
                other_name, other = first[k]
                raise DataError(
                    f"prompt {r.prompt!r:.100} is in split '{name}' and also in split '{other_name}' "
                    f"({_where(other)}); splits must not share prompts",
                    file=r.file,
                    row=r.row,
                    field="prompt",
                )
            first.setdefault(k, (name, r))


def load_user_splits(
    seed: str | os.PathLike | None,
    iterations: Sequence[str | os.PathLike],
    holdout: str | os.PathLike | None = None,
    *,
    cache_dir: str | None = None,
    **pair_kwargs,
) -> DataSplits:
    """Splits given as files: ``seed`` a preference file (D0; None for no seed data),
    ``iterations`` one prompt file each (a ``prompt`` column; responses ignored), ``holdout``
    a prompt file. Each file is loaded with the loaders' policies (``pair_kwargs`` go to
    :func:`~spa_ray.data.ultrafeedback.load_ultrafeedback` for the seed); then the sets must
    be disjoint by prompt, else DataError naming the prompt, the files and rows."""
    from .ultrafeedback import load_prompts, load_ultrafeedback

    seed_pairs = list(load_ultrafeedback(seed, cache_dir=cache_dir, **pair_kwargs)) if seed is not None else []
    iters = [list(load_prompts(p, cache_dir=cache_dir)) for p in iterations]
    hold = list(load_prompts(holdout, cache_dir=cache_dir)) if holdout is not None else []
    splits = DataSplits(seed=seed_pairs, iterations=iters, holdout=hold)
    splits.assert_disjoint()
    return splits
