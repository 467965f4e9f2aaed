"""Moving confidence window and the noise flag z (SPA Eq. 9/11, Appendix B.4).

The paper keeps a simple moving window over the most recent 50 confidences and flags a
pair as possibly mislabelled (z = 1) when its confidence is below the lower K% bound tau
of that window. Denoising is off (z = 0) for the first `warmup_fraction` of the steps,
while the window still fills.

Choices (and how they differ from the official SPA code, kingdy2002/SPA, trl fork):

* Data parallelism. The official trainer keeps one window per rank, fed per-rank batch
  means, so ranks compute different tau from different data. Here `flags` first calls
  `gather` (e.g. `distributed.all_gather_1d`), so every rank appends *all* ranks'
  confidences in rank order and computes the same tau: the window equals that of one
  process fed the global batch. `flags` is therefore a collective: call it on every rank
  at every step, warm-up included.
* Window items are per-sample confidences (the paper: "the most recent 50 samples"),
  not per-batch means as in the official code.
* Order: the batch is appended first, then tau is taken. The current batch *is* among
  the most recent samples, so tau is never stale and never undefined (the official code
  uses the previous step's threshold and a placeholder 0 until 50 entries exist). If a
  global batch is larger than the window, only its last `size` samples are kept.
* Percentile: `torch.quantile(window, K/100, interpolation="linear")` in float64 (numpy's
  default percentile). For a full window of 50 and K = 10 that is position 4.9 of the
  sorted window, so with distinct values exactly 5 samples (10%) lie strictly below it
  (the official code averages the sorted values at indices int(50K/100) and +1).
* z = 1 iff p < tau (strict), so a window of identical values flags nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import NonFiniteValuesError, check_1d, check_floating
from .noise_detection import lambda_for_iteration  # noqa: F401  (re-export; CONTRACT.md)

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ConfidenceWindow:
    """The most recent `size` confidences (all DP ranks), their lower `k_percent` bound tau, and z."""

    def __init__(
        self,
        size: int = 50,
        k_percent: float = 10.0,
        warmup_fraction: float = 0.2,
        gather: Gather | None = None,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size (window size) must be an int >= 1, got {size!r}")
        if not isinstance(k_percent, (int, float)) or isinstance(k_percent, bool) or not (0.0 < k_percent < 100.0):
            raise ValueError(f"k_percent must be in the open interval (0, 100), got {k_percent!r}")
        if (
            not isinstance(warmup_fraction, (int, float))
            or isinstance(warmup_fraction, bool)
            or not (0.0 <= warmup_fraction < 1.0)
        ):
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if gather is not None and not callable(gather):
            raise ValueError(f"gather must be a callable or None, got {type(gather).__name__}")
        self.size = size
        self.k_percent = float(k_percent)
        self.warmup_fraction = float(warmup_fraction)
        self.gather: Gather = gather if gather is not None else _identity
        self._values = torch.empty(0, dtype=torch.float64)
        self.tau: float | None = None  # threshold from the latest update; None before any sample

    def __len__(self) -> int:
        return int(self._values.numel())

    @property
    def values(self) -> torch.Tensor:
        """The window, oldest first (float64, CPU; a copy)."""
        return self._values.clone()

    def in_warmup(self, step: int, total_steps: int) -> bool:
        """True while step < warmup_fraction * total_steps (step counts from 0)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        return step < self.warmup_fraction * total_steps

    @torch.no_grad()
    def update(self, confidences: torch.Tensor) -> float | None:
        """Gather `confidences` from all ranks, append them, evict the oldest, return the new tau."""
        check_1d("confidences", confidences)
        check_floating(confidences=confidences)
        local = confidences.detach()
        if not bool(torch.isfinite(local).all()):
            raise NonFiniteValuesError("confidences must be finite (found NaN or inf)")
        gathered = self.gather(local)
        if not isinstance(gathered, torch.Tensor) or gathered.dim() != 1:
            raise ValueError("gather must return a 1-D tensor (the concatenation over ranks)")
        self._values = torch.cat([self._values, gathered.detach().to("cpu", torch.float64)])[-self.size :]
        if len(self):
            self.tau = float(torch.quantile(self._values, self.k_percent / 100.0, interpolation="linear"))
        return self.tau

    @torch.no_grad()
    def flags(self, confidences: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        """z [B] (0./1. in the confidences' dtype and device): 1 where p < tau, all 0 during warm-up.

        Always updates the window (warm-up included) and is a collective under DP.
        """
        warm = self.in_warmup(step, total_steps)
        tau = self.update(confidences)
        if warm or tau is None:
            return torch.zeros_like(confidences, dtype=confidences.dtype).detach()
        return (confidences.detach().to(torch.float64) < tau).to(confidences.dtype)

    def state_dict(self) -> dict:
        """Plain data for checkpoint/resume."""
        return {"values": self._values.tolist(), "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self._values = torch.tensor(state["values"], dtype=torch.float64)[-self.size :]
        self.tau = state.get("tau")
