"""Launching one training stage as a Ray Train ``TorchTrainer`` worker group.

Placement comes from config (workers, CPUs/GPUs and custom resources per worker); the
backend follows the device: NCCL with GPUs, gloo without. A worker failure restarts the
group from the last step checkpoint (``FailureConfig``), which carries the optimizer,
scheduler, confidence window, RNG and data position.
"""

from __future__ import annotations

from pathlib import Path

from spa_ray.config.placement import ActorGroup
from spa_ray.training.worker import NonFiniteLossError, TrainStageSpec, train_loop_per_worker


def run_train_stage(spec: TrainStageSpec, workers: ActorGroup, storage_dir: str | Path, max_failures: int = 2) -> Path:
    """Train ``spec`` on ``workers``; returns ``spec.output_dir`` holding the HF folder."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = workers.num_gpus > 0
    resources = {"CPU": workers.num_cpus, **workers.resources}
    if use_gpu:
        resources["GPU"] = workers.num_gpus
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.stage,
            storage_path=str(Path(storage_dir).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        cause = _nonfinite_cause(exc)
        if cause is not None:  # the worker's own message, not a Ray Train traceback
            raise NonFiniteLossError(cause) from None
        raise
    return Path(spec.output_dir)


def _nonfinite_cause(exc: BaseException) -> str | None:
    """The message of a NonFiniteLossError raised by any worker behind a Ray Train error."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, NonFiniteLossError) and not isinstance(getattr(e, "cause", None), NonFiniteLossError):
            return str(e)
        todo += list(getattr(e, "worker_failures", {}).values())
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
