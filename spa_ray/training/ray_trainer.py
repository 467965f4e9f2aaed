"""One training stage on a trainer group of its own (tools and tests; the pipeline keeps
one ``TrainerGroup`` for the whole job instead).

Placement comes from config (workers, CPUs/GPUs and custom resources per worker); the
backend follows the device: NCCL with GPUs, gloo without. A worker failure restarts the
group from the last step checkpoint, which carries the optimizer, scheduler, confidence
window, RNG and data position; ``max_failures`` restarts per stage.
"""

from __future__ import annotations

from pathlib import Path

from spa_ray.config.placement import ActorGroup
from spa_ray.training.trainer_group import TrainerGroup
from spa_ray.training.worker import TrainStageSpec


def run_train_stage(spec: TrainStageSpec, workers: ActorGroup, storage_dir: str | Path, max_failures: int = 2) -> Path:
    """Train ``spec`` on ``workers``; returns ``spec.output_dir`` holding the HF folder."""
    with TrainerGroup(workers, storage_dir, max_failures=max_failures) as group:
        return group.train_stage(spec).output_dir
