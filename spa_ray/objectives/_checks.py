"""Argument checks shared by the objective and judging functions.

Kept in one place so every bad argument fails early with a ValueError that names the
argument and says why, instead of a broadcasting surprise or a NaN many steps later.
"""

from __future__ import annotations

import math

import torch


class NonFiniteValuesError(ValueError):
    """NaN or inf reached a formula: the training run must stop, not retry (a restart meets it again)."""


def check_positive(name: str, value: float) -> float:
    """`value` must be a finite number > 0 (e.g. beta: it scales a log-ratio into a logit)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    """`value` in the closed interval [0, 1]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_same_shape(**tensors: torch.Tensor) -> torch.Size:
    """All named tensors must be tensors of one shape; the error lists every name and shape."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc} must all have the same shape")
    return next(iter(tensors.values())).shape


def check_1d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D tensor [B], got {shape}")


def check_floating(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """A bool mask, or an integer/float mask holding only 0 and 1 (converted to bool).

    Anything else (e.g. 2, 0.5, -100) almost always means a label tensor was passed by
    mistake, so it is refused rather than silently thresholded.
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or hold only 0/1, got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        values = torch.unique(mask[bad])[:5].tolist()
        raise ValueError(f"{name} must be bool or hold only 0/1 values; found {values}")
    return mask != 0


def rows(idx: torch.Tensor, limit: int = 20) -> str:
    """Row indices of a bool vector as a short string for error messages."""
    ids = torch.nonzero(idx, as_tuple=False).flatten().tolist()
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return f"{ids[:limit]}{more}"
