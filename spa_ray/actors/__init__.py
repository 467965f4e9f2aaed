"""Layer 4: generator and judge actors, the sharded actor pool, and weight broadcast.

Thin Ray shells around layers 1-2: no SPA math lives here.
"""

from spa_ray.actors.base import StaleWeightsError, WeightsError, WeightsMismatchError
from spa_ray.actors.generator import GeneratorActor, generate_rows
from spa_ray.actors.judge import JudgeActor, gold_accuracy, label_rows
from spa_ray.actors.pool import ShardedActors, StageFailedError, contiguous_shards
from spa_ray.actors.weight_sync import (
    NcclUnavailableError,
    WeightSyncError,
    broadcast_weights,
    check_weight_sync_method,
)

__all__ = [
    "GeneratorActor",
    "JudgeActor",
    "ShardedActors",
    "StageFailedError",
    "StaleWeightsError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightSyncError",
    "NcclUnavailableError",
    "broadcast_weights",
    "check_weight_sync_method",
    "contiguous_shards",
    "generate_rows",
    "gold_accuracy",
    "label_rows",
]
