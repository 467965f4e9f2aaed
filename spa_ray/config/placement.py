"""Where things run and how weights travel: the placement part of the run configuration.

Below the layers that use it (actors/pool.py and training/ray_trainer.py take an
``ActorGroup``); ``pipeline.config.SPAConfig`` composes these into the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spa_ray.config.tree import ConfigError, field

__all__ = ["ActorGroup", "PlacementConfig", "WeightSyncConfig"]


@dataclass
class ActorGroup:
    """How many actors of one kind and what each asks Ray for."""

    count: int = field(1, help="Number of actors (trainer: Ray Train workers).")
    num_cpus: float = field(1.0, help="CPUs reserved per actor.")
    num_gpus: float = field(0.0, help="GPUs per actor (fractions share a GPU; vLLM: tensor_parallel_size).")
    resources: dict = field(
        default_factory=dict, help="Custom Ray resources per actor, e.g. {node_pool_a: 1} to pin to nodes."
    )
    threads: Optional[int] = field(
        None,
        help="torch threads per actor; None: Ray's (its num_cpus, at least 1). More than num_cpus lets a group use "
        "cores the others leave idle in its stages (the trainer during training).",
    )

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"placement: count must be >= 1, got {self.count}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("placement: num_cpus and num_gpus must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"placement: threads must be >= 1 or null, got {self.threads}")


def _shared_cpu_group() -> ActorGroup:
    return ActorGroup(count=1, num_cpus=0.5)


@dataclass
class PlacementConfig:
    """Defaults fit a 2-core machine: stages run one after another, so actors share the cores."""

    generators: ActorGroup = field(default_factory=_shared_cpu_group, help="Generator actors.")
    judges: ActorGroup = field(default_factory=_shared_cpu_group, help="Judge actors.")
    trainer: ActorGroup = field(default_factory=ActorGroup, help="Ray Train workers (DeepSpeed ranks).")
    ray_address: Optional[str] = field(
        None, help="Ray cluster to join ('auto' inside `ray job submit`); None starts a local one."
    )


@dataclass
class WeightSyncConfig:
    method: Literal["object_store", "nccl", "gloo"] = field(
        "object_store",
        help="Broadcast path after each stage: the Ray object store, or a collective group from a sender to the vLLM "
        "workers: nccl between GPUs, gloo (its CPU twin) between CPU processes.",
    )
    timeout_s: float = field(600.0, help="A broadcast slower than this fails over to reloading the checkpoint.")
