"""ShardedActors: a group of identical actors placed from config, with sharded stage calls.

Placement: ``group.count`` actors, each asking Ray for ``num_cpus``, ``num_gpus`` and
the custom ``resources`` of its ActorGroup, so config alone decides nodes and devices.

Fault tolerance (two layers):
1. Ray: actors get ``max_restarts`` and ``max_task_retries``. A killed actor is
   restarted (its ``__init__`` re-runs with the ORIGINAL arguments, i.e. the pi_init /
   initial checkpoint) and the call it was running is retried on it by Ray.
2. Weights: every stage call is ``call_synced(state, method, ...)`` where ``state`` is the
   pool's current target (version, checkpoint path[, judge reference]). The actor first
   reloads that checkpoint if its version differs, so a restarted actor can never serve a
   stage with stale weights, whether Ray or the pool retries the call.
   If Ray's retries are exhausted (``RayActorError`` reaches us), the pool re-syncs and
   resubmits the shard to a live actor (the restarted one or another), up to
   ``max_shard_attempts``. Execution is at-least-once; results are exactly-once: a shard's
   result is taken from the one attempt that returned, and shards are concatenated in
   item order. Application errors (bad input, a raised exception) are NOT retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
from tqdm.auto import tqdm
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from spa_ray.weights.errors import StaleWeightsError
from spa_ray.config.placement import ActorGroup

__all__ = ["ShardedActors", "ShardedCall", "contiguous_shards", "StageFailedError"]

logger = logging.getLogger(__name__)


class StageFailedError(RuntimeError):
    """A shard could not be completed on any actor within the allowed attempts."""


def contiguous_shards(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Balanced contiguous [start, stop) ranges: sizes differ by at most one, larger first."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_items, num_shards)
    out, start = [], 0
    for k in range(num_shards):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class ShardedActors:
    """``group.count`` actors of `actor_cls` (a WeightedActor subclass) built from config.

    Args:
        actor_cls: the plain class (GeneratorActor, JudgeActor); ray.remote is applied here.
        group: ActorGroup (count, num_cpus, num_gpus, resources).
        init_kwargs: constructor arguments shared by every actor. The initial target
            state is (init_kwargs["version"] or 0, init_kwargs["model_path"] or
            init_kwargs["policy_path"]).
        name: pool name used in actor labels ("<name>[i]") and errors.
        max_restarts, max_task_retries: Ray's actor fault-tolerance options.
        max_shard_attempts: pool-level attempts per shard after Ray's own retries.
        health_timeout_s: how long to wait for an actor's answer when looking for a live one.
        shards_per_actor: shards per actor in map_shards (progress granularity, balance).
        progress: show a tqdm bar per map_shards call.
    """

    def __init__(
        self,
        actor_cls: type,
        group: ActorGroup,
        init_kwargs: dict[str, Any],
        name: str,
        max_restarts: int = 3,
        max_task_retries: int = 2,
        max_shard_attempts: int = 3,
        health_timeout_s: float = 300.0,
        shards_per_actor: int = 4,
        progress: bool = True,
    ):
        self.actor_cls = actor_cls
        self.group = group
        self.init_kwargs = dict(init_kwargs)
        self.name = name
        self.max_shard_attempts = int(max_shard_attempts)
        self.shards_per_actor = int(shards_per_actor)
        self.progress = bool(progress)
        self.health_timeout_s = float(health_timeout_s)
        path = self.init_kwargs.get("model_path", self.init_kwargs.get("policy_path"))
        self.state: dict[str, Any] = {
            "version": int(self.init_kwargs.get("version", 0)),
            "path": os.fspath(path) if path is not None else None,
        }
        options: dict[str, Any] = dict(
            num_cpus=group.num_cpus,
            num_gpus=group.num_gpus,
            max_restarts=int(max_restarts),
            max_task_retries=int(max_task_retries),
        )
        if group.resources:
            options["resources"] = dict(group.resources)
        remote_cls = ray.remote(actor_cls)
        self.labels = [f"{name}[{i}]" for i in range(group.count)]
        self.actors = [
            remote_cls.options(**options).remote(label=label, **self.init_kwargs) for label in self.labels
        ]

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def supports_collective(self) -> bool:
        """Whether these actors can join a weight-update group (vLLM generators)."""
        backends = getattr(self.actor_cls, "SUPPORTS_COLLECTIVE_BACKENDS", ())
        return self.init_kwargs.get("backend") in backends

    # -- state -------------------------------------------------------------------------
    def set_target(self, version: int, path) -> None:
        """Record the version every actor must hold and the checkpoint it comes from."""
        self.state = {**self.state, "version": int(version), "path": os.fspath(path)}

    def set_reference(self, path) -> None:
        """Judges: swap the judge reference on every actor (and after any restart)."""
        self.state = {**self.state, "reference_path": os.fspath(path) if path is not None else None}
        ray.get([a.set_reference.remote(self.state["reference_path"]) for a in self.actors])

    def wait_ready(self, timeout_s: float | None = None) -> list[dict]:
        """Block until every actor is constructed; returns versions()."""
        return ray.get([a.weights_info.remote() for a in self.actors], timeout=timeout_s)

    def _get_patiently(self, k: int, method: str, *args):
        """``actors[k].method(*args)``, waiting out a restart (ActorUnavailableError)."""
        deadline = time.monotonic() + self.health_timeout_s
        while True:
            try:
                return ray.get(getattr(self.actors[k], method).remote(*args), timeout=self.health_timeout_s)
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def versions(self) -> list[dict]:
        """Every actor's weights_info (label, version, checksum, node_id, path, pid).

        Waits for an actor that is restarting to come back; an actor that is dead for
        good is reported with version None and "error".
        """
        refs = [a.weights_info.remote() for a in self.actors]
        out = []
        for k, ref in enumerate(refs):
            try:
                try:
                    out.append(ray.get(ref))
                except ActorUnavailableError:
                    out.append(self._get_patiently(k, "weights_info"))
            except RayActorError as exc:  # dead for good: reported, so require_version names it
                out.append(
                    {"label": self.labels[k], "version": None, "checksum": None, "node_id": None,
                     "path": None, "pid": None, "error": type(exc).__name__}
                )
        return out

    def require_version(self, version: int) -> list[dict]:
        """Raise StaleWeightsError naming each actor that does not hold `version`."""
        infos = self.versions()
        stale = [i for i in infos if i["version"] != version]
        if stale:
            detail = "; ".join(
                f"{i['label']} holds version {i['version']} "
                + (f"({i['error']})" if i.get("error") else f"(node {i['node_id']})")
                for i in stale
            )
            raise StaleWeightsError(
                f"pool {self.name!r} must hold weights version {version} before this stage, but {detail}"
            )
        return infos

    def resync(self) -> list[dict]:
        """Reload the current checkpoint on every live actor whose version differs."""
        return [info for k in range(len(self.actors)) if (info := self._resync_one(k)) is not None]

    def _resync_one(self, k: int) -> dict | None:
        try:
            self._get_patiently(k, "sync_to", self.state)
            return self._get_patiently(k, "weights_info")
        except (RayActorError, GetTimeoutError) as exc:
            logger.warning("%s could not be re-synced: %s", self.labels[k], type(exc).__name__)
            return None

    # -- stage calls ---------------------------------------------------------------------
    def _submit(self, k: int, method: str, args: tuple, kwargs: dict):
        return self.actors[k].call_synced.remote(self.state, method, args, kwargs)

    def _live_actor(self, after: int) -> int:
        """Index of an actor that answers (trying the others first, then `after` itself)."""
        n = len(self.actors)
        for k in [(after + d) % n for d in range(1, n + 1)]:
            try:
                ray.get(self.actors[k].ping.remote(), timeout=self.health_timeout_s)
                return k
            except (RayActorError, GetTimeoutError) as exc:
                logger.warning("%s is not available: %s", self.labels[k], type(exc).__name__)
        raise StageFailedError(f"pool {self.name!r}: no actor is alive")

    def map_shards(
        self,
        method: str,
        items: Sequence,
        *,
        index_arg: str | None = None,
        shard_kwargs: dict[str, Sequence] | None = None,
        **kwargs,
    ) -> list:
        """Split `items` into contiguous balanced shards, one per actor; call `method`.

        ``actor.method(shard, **kwargs)`` (plus ``index_arg=start`` when given, e.g.
        generate's first_index; plus each ``shard_kwargs`` sequence, one entry per item,
        sliced like `items`) must return a list; the lists are concatenated in item
        order. An actor dying mid-call is handled as described in the module docstring.
        """
        items = list(items)
        for k, v in (shard_kwargs or {}).items():
            if len(v) != len(items):
                raise ValueError(f"shard_kwargs[{k!r}] has {len(v)} entries for {len(items)} items")
        call = ShardedCall(self, method, len(items), index_arg=index_arg, **kwargs)
        for k in range(len(call.shards)):
            call.submit(k, items, shard_kwargs)
        call.run_to_end()
        return call.collect()

    def call_all(self, method: str, *args, **kwargs) -> list:
        """``method(*args, **kwargs)`` on every actor (weights synced first); results in actor order."""
        return ray.get([self.actors[k].call_synced.remote(self.state, method, args, kwargs) for k in range(len(self))])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class ShardedCall:
    """One sharded stage call on a pool, submitted shard by shard and collected as shards finish.

    The shards are ``contiguous_shards(num_items, actors x shards_per_actor)``: a call fed
    shard by shard (``submit``) computes each shard on the same items as ``map_shards`` does,
    so streaming work into a pool (e.g. judging each shard as soon as its generations exist)
    gives the same results. ``handle(ref)`` takes one finished call: it stores the result and
    returns the shard index, or resubmits the shard after an actor died (None).
    """

    def __init__(self, pool: ShardedActors, method: str, num_items: int, *, index_arg: str | None = None, **kwargs):
        self.pool, self.method, self.index_arg, self.kwargs = pool, method, index_arg, kwargs
        self.shards = contiguous_shards(num_items, len(pool.actors) * max(1, pool.shards_per_actor))
        self.results: list[list | None] = [None] * len(self.shards)
        self.pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (shard, actor, attempt)
        self._calls: dict[int, tuple[tuple, dict]] = {}
        self.died: set[int] = set()
        self.progress = tqdm(total=num_items, desc=f"{pool.name}.{method}", unit="item", disable=not pool.progress)

    def submit(self, k: int, items: Sequence, shard_kwargs: dict[str, Sequence] | None = None) -> None:
        """Shard ``k`` of ``items`` (the whole item list, or any list indexed like it)."""
        start, stop = self.shards[k]
        if stop <= start:
            self.results[k] = []
            return
        kw = dict(self.kwargs)
        if self.index_arg is not None:
            kw[self.index_arg] = start
        for name, values in (shard_kwargs or {}).items():
            if len(values) < stop:
                raise ValueError(f"shard_kwargs[{name!r}] has {len(values)} entries, shard {k} needs {stop}")
            kw[name] = list(values[start:stop])
        self._calls[k] = ((list(items[start:stop]),), kw)
        self._call(k, k % len(self.pool.actors), 1)

    def _call(self, k: int, actor: int, attempt: int) -> None:
        args, kw = self._calls[k]
        self.pending[self.pool._submit(actor, self.method, args, kw)] = (k, actor, attempt)

    def handle(self, ref) -> int | None:
        k, actor, attempt = self.pending.pop(ref)
        try:
            out = ray.get(ref)
        except RayActorError as exc:
            if attempt >= self.pool.max_shard_attempts:
                raise StageFailedError(
                    f"pool {self.pool.name!r}: shard {k} ({self.method}, items {self.shards[k][0]}:{self.shards[k][1]}) "
                    f"failed {attempt} times; last on {self.pool.labels[actor]}: {exc}"
                ) from exc
            self.died.add(actor)
            nxt = self.pool._live_actor(actor)
            logger.warning(
                "%s died during %s (shard %d, attempt %d): retrying on %s after re-syncing its weights",
                self.pool.labels[actor], self.method, k, attempt, self.pool.labels[nxt],
            )
            self._call(k, nxt, attempt + 1)  # call_synced re-syncs the weights first
            return None
        if not isinstance(out, list):
            raise TypeError(f"{self.pool.labels[actor]}.{self.method} returned {type(out).__name__}, expected a list")
        self.results[k] = out
        self.progress.update(self.shards[k][1] - self.shards[k][0])
        return k

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.results)

    def run_to_end(self) -> None:
        """Wait for every submitted shard."""
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            self.handle(ready[0])

    def collect(self) -> list:
        """The shards' results in item order; restarted actors are re-synced first."""
        self.progress.close()
        if not self.done:
            raise RuntimeError(f"pool {self.pool.name!r}: {self.method}: shards left unsubmitted or unfinished")
        for k in sorted(self.died):  # bring restarted actors back to the current weights now
            self.pool._resync_one(k)
        return [x for part in self.results for x in part]
