"""Weight movement, in one home: how a new policy reaches every generator and judge.

- ``packing``: weights as data (packed state dicts for the object store, byte records for
  vLLM's RPC);
- ``broadcast``: ``broadcast_weights``, every route with its deadline and the checkpoint
  fallback; ``collective``: the sender-and-workers group (NCCL on GPUs, gloo on CPU);
- ``vllm_worker``: the extension that receives weights inside vLLM's workers;
- ``errors``: why weights did not arrive.
Checksums and checkpoint reading are in ``spa_ray.models.loading`` (below every layer).
"""

from spa_ray.weights.broadcast import CHECKPOINT_FALLBACK, OBJECT_STORE, broadcast_weights, check_weight_sync_method
from spa_ray.weights.collective import GLOO, NCCL
from spa_ray.weights.errors import (
    EngineWeightsError,
    NcclUnavailableError,
    StaleWeightsError,
    WeightsError,
    WeightsMismatchError,
    WeightSyncError,
)
from spa_ray.weights.packing import PackedStateDict, pack_state_dict, unpack_state_dict

__all__ = [
    "CHECKPOINT_FALLBACK",
    "GLOO",
    "NCCL",
    "OBJECT_STORE",
    "EngineWeightsError",
    "NcclUnavailableError",
    "PackedStateDict",
    "StaleWeightsError",
    "WeightSyncError",
    "WeightsError",
    "WeightsMismatchError",
    "broadcast_weights",
    "check_weight_sync_method",
    "pack_state_dict",
    "unpack_state_dict",
]
