"""The trainer group: one Ray Train worker group for the whole job, one call per stage.

Starting a ``TorchTrainer`` per stage cost ~29 s on CPU (processes, imports, the process
group, DeepSpeed's op load, two model loads) -- more than the stage's own steps at the
embedded size. So the group starts once: ``start()`` runs one long ``fit()`` in a driver
daemon thread, whose train function (``worker.trainer_group_loop``) takes stage commands
from a ``StageMailbox``; ``train_stage(spec)`` posts one and waits for its outcome.

Why this shape: Ray Train stays the owner of the workers, their placement, the process
group and the restarts (a failed worker restarts the whole group, which resumes the
pending stage from its own step checkpoint); Ray Train offers no handle on its workers,
and ``fit()`` blocks, hence the thread and the mailbox. Each stage still starts as the
paper says: init = reference = pi_{t-1}, a fresh optimizer, schedule and engine; pi_{t-1}
comes from the ranks' memory when the command names its checksum, else from its folder.

Failures: Ray Train's budget is per ``fit()`` (here: the job), so it is unlimited and
the per-stage budget (``max_failures`` restarts) is counted by the mailbox. A stage that
exhausts it, or stops on a non-finite loss, raises here; the group itself stays up for
the next stage (a group that cannot start raises from ``fit()`` and the next call
starts a new one).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa_ray.config.placement import ActorGroup
from spa_ray.training.worker import NonFiniteLossError, TrainStageSpec, trainer_group_loop
from spa_ray.weights.handle import WeightsHandle

__all__ = ["StageFailedError", "StageResult", "TrainerGroup"]


class StageFailedError(RuntimeError):
    """A training stage failed more often than its budget allows."""


@dataclass
class StageResult:
    output_dir: Path
    weights: WeightsHandle | None  # pi_t in the object store (owned by rank 0), same tensors as output_dir
    seconds: float                 # wall time of the call, as the driver saw it
    step_seconds: float            # rank 0's time inside training steps
    steps: int
    attempts: int
    details: dict[str, Any]        # rank 0's split: models_seconds, setup_seconds, save_seconds, from_memory, ...

    @property
    def fixed_seconds(self) -> float:
        """Everything but the steps: what a warm group exists to make small."""
        return self.seconds - self.step_seconds


class TrainerGroup:
    def __init__(self, workers: ActorGroup, storage_dir: str | Path, max_failures: int = 2,
                 poll_s: float = 5.0):
        self.workers = workers
        self.storage_dir = Path(storage_dir)
        self.max_failures = max_failures
        self.poll_s = poll_s
        self._mailbox = None
        self._thread: threading.Thread | None = None
        self._fit_error: BaseException | None = None
        self._warming: int | None = None  # the id of a posted "warm" command not yet collected

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker group (returns at once; the first stage waits for the ranks)."""
        if self.running:
            return
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from spa_ray.training.mailbox import StageMailbox

        w = self.workers
        use_gpu = w.num_gpus > 0
        resources = {"CPU": w.num_cpus, **w.resources}
        if use_gpu:
            resources["GPU"] = w.num_gpus
        token = uuid.uuid4().hex[:12]
        self._mailbox = StageMailbox.remote(max_failures=self.max_failures)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            trainer_group_loop,
            train_loop_config={"mailbox": self._mailbox, "token": token, "threads": w.threads},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=w.count, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=f"trainer-{token}",
                storage_path=str(self.storage_dir.resolve()),
                failure_config=FailureConfig(max_failures=-1),  # the per-stage budget is the mailbox's
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        self._fit_error = None

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # surfaced by the stage waiting on it
                self._fit_error = exc

        self._thread = threading.Thread(target=fit, name="spa-ray-trainer-group", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Ask every rank to return, then wait for the ``fit()`` to end."""
        import ray

        if self._mailbox is None:
            return
        try:
            ray.get(self._mailbox.stop.remote(), timeout=10)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout_s)
        ray.kill(self._mailbox)
        self._mailbox = self._thread = self._warming = None

    def __enter__(self) -> "TrainerGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- stages --------------------------------------------------------------------
    def warm(self, path: str, trust_remote_code: bool = False) -> None:
        """Ask the ranks to hold the weights at ``path`` (the next stage's pi_{t-1}) in memory
        while the driver does other work; returns at once. ``warmed()`` gives their handle."""
        import ray

        self.start()
        self._warming = ray.get(self._mailbox.post.remote(
            {"path": str(path), "trust_remote_code": trust_remote_code}, kind="warm"))

    def warmed(self, timeout_s: float = 600.0) -> WeightsHandle | None:
        """The handle of the weights ``warm`` loaded (waits for it), or None: none asked, or
        the ranks could not load them (the stage then reads its folder, as without ``warm``)."""
        command_id, self._warming = self._warming, None
        if command_id is None or self._mailbox is None:
            return None
        state = self._wait(command_id, timeout_s)
        return state.get("outcome", {}).get("weights")

    def label(self, rows: list[dict], payload: dict[str, Any]) -> list[dict]:
        """Eq. 7-8 labels of ``rows`` by the group's ranks (``worker.label_on_rank``; payload:
        policy_path, policy_checksum, reference_path, beta, length_penalty,
        max_tokens_per_batch, dtype, version), one per row, in row order."""
        import ray

        self.start()
        command_id = ray.get(self._mailbox.post.remote({**payload, "rows": ray.put(list(rows))}, kind="label"))
        state = self._wait(command_id)
        if state["status"] != "done":
            raise StageFailedError(f"judging {len(rows)} pairs on the trainer group: "
                                   f"{state.get('error') or 'the trainer group stopped: ' + repr(self._fit_error)}")
        labels = state["outcome"]["labels"]
        if len(labels) != len(rows) or any(x is None for x in labels):
            raise StageFailedError(f"judging on the trainer group returned {len(labels)} labels for {len(rows)} rows")
        return labels

    def _wait(self, command_id: int, timeout_s: float = float("inf")) -> dict:
        """The command's final state; its pending state once the group has stopped or after
        ``timeout_s``."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            state = ray.get(self._mailbox.wait_result.remote(command_id, self.poll_s))
            if state["status"] != "pending" or not self.running or time.monotonic() > deadline:
                return state

    def train_stage(self, spec: TrainStageSpec) -> StageResult:
        """Run one stage on the group (started if it is not); returns when the folder is whole."""
        import ray

        self.start()
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        command_id = ray.get(self._mailbox.post.remote(spec.to_dict()))
        state = self._wait(command_id)
        if state["status"] == "pending":  # fit() ended without taking the command: the group could not run
            raise StageFailedError(f"stage {spec.stage}: the trainer group stopped: {self._fit_error!r}") \
                from self._fit_error
        seconds = time.perf_counter() - started
        if state["status"] == "failed":
            if state.get("fatal"):
                raise NonFiniteLossError(state["error"])
            raise StageFailedError(f"stage {spec.stage}: {state['error']}")
        outcome = state["outcome"]
        return StageResult(
            output_dir=Path(spec.output_dir), weights=outcome.pop("weights", None), seconds=seconds,
            step_seconds=float(outcome["step_seconds"]), steps=int(outcome["steps"]),
            attempts=int(state["attempts"]), details=outcome,
        )
