"""Why weights did not arrive: one family of errors for every route."""

from __future__ import annotations

__all__ = [
    "WeightsError",
    "WeightsMismatchError",
    "StaleWeightsError",
    "WeightSyncError",
    "NcclUnavailableError",
    "EngineWeightsError",
]


class WeightsError(RuntimeError):
    """Weights could not be loaded or synchronised."""


class WeightsMismatchError(WeightsError):
    """The weights an actor holds after a load do not have the expected checksum."""


class StaleWeightsError(WeightsError):
    """An actor holds a weights version other than the one a stage requires."""


class WeightSyncError(RuntimeError):
    """A broadcast could not bring every actor to the new version, even by reloading."""


class NcclUnavailableError(WeightSyncError, ValueError):
    """weight_sync.method='nccl' was asked for where it cannot run."""


class EngineWeightsError(RuntimeError):
    """A weight update into the vLLM engine failed, timed out, or its workers disagree."""
