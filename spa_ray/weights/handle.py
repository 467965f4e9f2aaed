"""Weights in memory: a handle on a packed state dict in Ray's object store.

The trainer's rank 0 publishes the policy it just saved (the same tensors, names and
dtypes as the safetensors files, so the checksum equals the checkpoint's on disk);
the driver broadcasts from the handle instead of reading the checkpoint back, and the
trainer's own ranks start the next stage from it. The object lives as long as its owner
(the rank-0 worker process that put it): if that process is gone, a reader gets an
``OwnerDiedError`` and falls back to ``path``, which exists before anyone reads the ref.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from spa_ray.weights.packing import pack_state_dict

__all__ = ["WeightsHandle", "publish_state_dict"]


@dataclasses.dataclass(frozen=True)
class WeightsHandle:
    ref: Any                   # ray.ObjectRef of a PackedStateDict
    checksum: str              # state_dict_checksum of those tensors == of the checkpoint files
    nbytes: int
    path: str | None = None    # the checkpoint folder holding the same tensors (the fallback)
    version: int | None = None  # the driver's weights version (pi_init = 0, pi_t = t + 1)

    def at(self, path: str, version: int | None = None) -> "WeightsHandle":
        """The same weights, known by their final checkpoint path (and version)."""
        return dataclasses.replace(self, path=str(path), version=version)


def publish_state_dict(state_dict: Mapping[str, torch.Tensor]) -> WeightsHandle:
    """``ray.put`` the packed tensors once; the caller's process owns the object."""
    import ray

    from spa_ray.models.loading import state_dict_checksum

    packed = pack_state_dict(state_dict)
    return WeightsHandle(ref=ray.put(packed), checksum=state_dict_checksum(state_dict), nbytes=packed.nbytes)
