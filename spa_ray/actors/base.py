"""WeightedActor: the weights bookkeeping shared by the actors that hold a policy.

Every actor that holds policy weights (generators, judges) keeps three facts about them:
the ``version`` (0 = pi_init / as constructed, t = pi_t; ``None`` = unknown, after a
load that failed half-way), the checkpoint ``path`` they came from, and a ``checksum``
(``models.loading.state_dict_checksum`` over the checkpoint's tensor names). A stage
refuses to run on stale weights: ``ShardedActors.require_version`` checks the version,
and every stage call carries the pool's target (version, path) so an actor that Ray
restarted (its ``__init__`` re-runs with the ORIGINAL arguments, i.e. pi_init) reloads
the current checkpoint before it serves (``WeightedActor.sync_to``).

How weights travel (packing, routes, errors) lives in ``spa_ray.weights``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum
from spa_ray.weights.errors import WeightsError, WeightsMismatchError
from spa_ray.weights.packing import resolve_state_dict, state_dict_nbytes

__all__ = ["WeightedActor", "current_node_id", "model_checksum", "copy_and_verify"]

logger = logging.getLogger(__name__)


def current_node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray
        return None


# ---------------------------------------------------------------------- actor mixin
class WeightedActor:
    """Version / checksum bookkeeping shared by GeneratorActor and JudgeActor.

    Subclasses implement ``_load_verified(state_dict, version, checksum) -> checksum``
    (copy the tensors in, verify, return the checksum of what the actor now holds, raise
    WeightsMismatchError otherwise) and ``_live_checksum() -> str``.
    """

    def _init_weights_state(self, label: str | None, path, version: int) -> None:
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        self.actor_label = label or type(self).__name__
        self._path = os.fspath(path) if path is not None else None
        self._version: int | None = version
        self._checksum: str | None = None

    # -- subclass hooks ----------------------------------------------------------------
    def _load_verified(self, state_dict: Mapping[str, torch.Tensor], version: int, checksum: str) -> str:
        raise NotImplementedError

    def _live_checksum(self) -> str:
        raise NotImplementedError

    def _sync_extra(self, state: Mapping[str, Any]) -> None:
        """Pool state beyond (version, path), e.g. the judge's reference."""

    # -- public API ----------------------------------------------------------------------
    def load_weights(self, state_dict_or_ref, version: int, checksum: str, path=None) -> dict:
        """Copy new weights in (mapping, PackedStateDict or ObjectRef), verify `checksum`.

        On a checksum mismatch the version becomes None (unknown) and WeightsMismatchError
        is raised: the actor then serves no stage until it is reloaded.
        """
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        t0 = time.perf_counter()
        sd = resolve_state_dict(state_dict_or_ref)
        nbytes = state_dict_nbytes(sd)
        self._version = None  # unknown until the load is verified
        self._checksum = None
        try:
            got = self._load_verified(sd, version, checksum)
        except WeightsMismatchError:
            raise
        except Exception as exc:
            raise WeightsError(f"{self.actor_label}: loading weights version {version} failed: {exc}") from exc
        self._version, self._checksum = version, got
        if path is not None:
            self._path = os.fspath(path)
        return {**self.weights_info(), "seconds": time.perf_counter() - t0, "bytes": nbytes}

    def reload_from_checkpoint(self, path, version: int) -> dict:
        """The fallback path: read the checkpoint folder here and load it (checksum verified)."""
        t0 = time.perf_counter()
        sd = load_checkpoint_state_dict(path)
        info = self.load_weights(sd, version, state_dict_checksum(sd), path=path)
        info["seconds"] = time.perf_counter() - t0
        return info

    def weights_info(self) -> dict:
        if self._checksum is None and self._version is not None:
            self._checksum = self._live_checksum()
        return {
            "label": self.actor_label,
            "version": self._version,
            "checksum": self._checksum,
            "node_id": current_node_id(),
            "path": self._path,
            "pid": os.getpid(),
        }

    def sync_to(self, state: Mapping[str, Any]) -> bool:
        """Bring this actor to the pool's target state; True if it had to reload."""
        reloaded = False
        if self._version != state["version"]:
            logger.warning(
                "%s holds weights version %s but its pool is at %s: reloading %s",
                self.actor_label, self._version, state["version"], state["path"],
            )
            self.reload_from_checkpoint(state["path"], state["version"])
            reloaded = True
        self._sync_extra(state)
        return reloaded

    def call_synced(self, state: Mapping[str, Any], method: str, args: tuple = (), kwargs: dict | None = None):
        """``sync_to(state)`` then ``method(*args, **kwargs)``: what every stage call runs.

        Ray may run this more than once (max_task_retries after a restart): the methods
        called this way are pure functions of (weights, inputs), so that is harmless.
        """
        if method.startswith("_"):
            raise ValueError(f"call_synced only calls public methods, got {method!r}")
        self.sync_to(state)
        return getattr(self, method)(*args, **(kwargs or {}))

    def ping(self) -> str:
        return self.actor_label


# ------------------------------------------------------------- torch-model helpers
def model_checksum(model: torch.nn.Module, names=None) -> str:
    """state_dict_checksum of the model's tensors named in `names` (default: all).

    Restricting to the checkpoint's names makes a model with tied weights (lm_head
    stored once by save_pretrained) checksum like its checkpoint.
    """
    sd = model.state_dict()
    if names is None:
        return state_dict_checksum(sd)
    return state_dict_checksum({k: sd[k] for k in names if k in sd})


def copy_and_verify(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], checksum: str, label: str) -> str:
    """Copy `state_dict` into `model` (strict names/shapes) and verify the result.

    Same dtypes: the model's tensors (over the sent names) must checksum to `checksum`.
    Different dtypes (the actor runs in another dtype than the checkpoint): the sent
    tensors must checksum to `checksum` (transfer) and the model must hold exactly the
    sent tensors cast to its dtypes (load). Returns the model's checksum over the names.
    """
    from spa_ray.generation.transformers_backend import copy_state_dict_strict

    copy_state_dict_strict(model, state_dict)
    live = model.state_dict()
    names = sorted(state_dict)
    got = state_dict_checksum({k: live[k] for k in names})
    if all(state_dict[k].dtype == live[k].dtype for k in names):
        if got != checksum:
            raise WeightsMismatchError(f"{label}: weights checksum after loading is {got[:12]}, expected {checksum[:12]}")
        return got
    sent = state_dict_checksum(state_dict)
    if sent != checksum:
        raise WeightsMismatchError(f"{label}: received weights checksum {sent[:12]}, expected {checksum[:12]}")
    cast = state_dict_checksum({k: state_dict[k].to(live[k].dtype) for k in names})
    if got != cast:
        raise WeightsMismatchError(f"{label}: model does not hold the received weights after loading")
    return got
