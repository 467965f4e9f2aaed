"""Layer 4: generator and judge actors and the sharded actor pool (weights travel by spa_ray.weights).

Thin Ray shells around layers 1-2: no SPA math lives here.
"""

from spa_ray.actors.generator import GeneratorActor, generate_rows
from spa_ray.actors.judge import JudgeActor, gold_accuracy, label_rows
from spa_ray.actors.pool import ShardedActors, StageFailedError, contiguous_shards

__all__ = [
    "GeneratorActor",
    "JudgeActor",
    "ShardedActors",
    "StageFailedError",
    "contiguous_shards",
    "generate_rows",
    "gold_accuracy",
    "label_rows",
]
