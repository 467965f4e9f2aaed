"""Broadcast of new policy weights to every generator and judge actor, with a fallback.

``broadcast_weights(pools, checkpoint_dir, version, method, timeout_s)``:

- ``object_store`` (CPU and GPU): the caller reads the safetensors checkpoint ONCE (CPU),
  packs it as numpy arrays and ``ray.put``s it ONCE; every actor's ``load_weights`` gets
  the same ObjectRef (same-node readers map it zero-copy) and verifies the checksum after
  loading. The calls are awaited with ``ray.wait(timeout=timeout_s)``.
- ``nccl`` (GPU) and ``gloo`` (CPU), vLLM generators only: a sender actor loads the
  checkpoint (onto its GPU for nccl) and forms a group with every vLLM worker of every
  generator (rank 0 = sender, then each engine's workers, counted from the running engine),
  then broadcasts each tensor in sorted-name order; the workers stream what they receive
  into vLLM's in-place ``reload_weights`` and report the checksum of what arrived
  (``SPACollectiveWorkerExtension``). NCCL is vLLM's PyNcclCommunicator (its RLHF example's
  recipe); gloo is torch's ProcessGroupGloo, the same route between CPU processes, which
  runs here with vLLM's CPU backend. Pools that are not vLLM generators (the judges run
  transformers) take the object-store path in the same call. Every step has a deadline
  (sender start, rendezvous, each receive); collective calls are never retried by Ray;
  the group is destroyed after each update. The NCCL communicator itself is unrun here.

Fallback (every method): an actor whose load times out or fails reloads the checkpoint
folder itself (``reload_from_checkpoint``); a warning names the actors and the reasons.
On the collective route a timed-out receiver is blocked inside a collective, so it is first restarted
(``ray.kill(no_restart=False)``; it re-inits from its original checkpoint) and then
reloaded. Every pool's target is set to (version, checkpoint_dir) before anything is
sent, so a stage call on an actor that missed the broadcast reloads it too. Finally
``require_version(version)`` on every pool; the function returns a report.

A collective method requested where it cannot run (no vLLM generators; nccl without GPUs) is a
configuration error: ``NcclUnavailableError`` at once, before any weights move. We chose
to fail fast rather than fall back silently to the object store, so that a GPU config
that lost its GPUs (or its vLLM backend) is noticed instead of running slowly.
``check_weight_sync_method`` runs the same check at start-up.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ray
import torch

from spa_ray.actors.base import (
    ChecksumAccumulator,
    load_checkpoint_state_dict,
    pack_state_dict,
    state_dict_nbytes,
)
from spa_ray.actors.pool import ShardedActors
from spa_ray.generation.vllm_backend import SPAWorkerExtension
from spa_ray.models.loading import state_dict_checksum

__all__ = [
    "WeightSyncError",
    "NcclUnavailableError",
    "broadcast_weights",
    "check_weight_sync_method",
    "SPACollectiveWorkerExtension",
    "CollectiveWeightSender",
    "collective_communicator",
]

logger = logging.getLogger(__name__)

OBJECT_STORE = "object_store"
CHECKPOINT_FALLBACK = "checkpoint_fallback"
NCCL = "nccl"
GLOO = "gloo"
COLLECTIVE = (NCCL, GLOO)


class WeightSyncError(RuntimeError):
    """A broadcast could not bring every actor to the new version, even by reloading."""


class NcclUnavailableError(WeightSyncError, ValueError):
    """weight_sync.method='nccl' was asked for where it cannot run."""


def _as_pools(pools) -> list[ShardedActors]:
    if isinstance(pools, ShardedActors):
        return [pools]
    return [p for p in pools]


def _wait(calls: dict, timeout_s: float | None) -> tuple[dict, dict]:
    """Await refs -> key; returns ({key: (result, seconds)}, {key: reason}) for failures."""
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + float(timeout_s)
    done: dict = {}
    failed: dict = {}
    remaining = list(calls)
    while remaining:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=left)
        for ref in ready:
            key = calls[ref]
            try:
                done[key] = (ray.get(ref), time.monotonic() - t0)
            except Exception as exc:  # RayActorError, RayTaskError(WeightsMismatchError), ...
                failed[key] = _reason(exc)
    for ref in remaining:
        failed[calls[ref]] = f"timed out after {timeout_s} s"
    return done, failed


def _reason(exc: BaseException) -> str:
    """One line saying why a call failed (the actor's own exception for a RayTaskError)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_weight_sync_method(method: str, pools: Iterable[ShardedActors] | None = None, generation_backend: str | None = None) -> None:
    """Fail fast when `method` cannot run with these pools / this backend / this cluster."""
    if method == OBJECT_STORE:
        return
    if method not in COLLECTIVE:
        raise ValueError(f"weight_sync.method must be 'object_store', 'nccl' or 'gloo', got {method!r}")
    where = "on GPUs" if method == NCCL else "on CPU"
    if generation_backend is not None and generation_backend != "vllm":
        raise NcclUnavailableError(
            f"weight_sync.method={method!r} needs generation.backend='vllm' {where}, got {generation_backend!r}; "
            "set weight_sync.method=object_store"
        )
    if pools is not None and not any(p.supports_collective for p in pools):
        raise NcclUnavailableError(
            f"weight_sync.method={method!r} needs vLLM generator actors {where}, but none of the pools "
            f"({', '.join(p.name for p in pools)}) is one; set weight_sync.method=object_store"
        )
    if method == NCCL and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) <= 0:
        raise NcclUnavailableError(
            "weight_sync.method='nccl' needs GPUs, but this Ray cluster has none; set weight_sync.method=object_store "
            "(or gloo, the same route between CPU processes)"
        )


def broadcast_weights(
    pools: ShardedActors | Sequence[ShardedActors],
    checkpoint_dir: str | os.PathLike,
    version: int,
    method: str = OBJECT_STORE,
    timeout_s: float = 600.0,
    fallback_timeout_s: float | None = None,
    sender_resources: dict | None = None,
) -> dict[str, Any]:
    """Bring every actor of `pools` to the weights in `checkpoint_dir` as `version`.

    Returns {"version", "method", "checkpoint", "checksum", "bytes", "seconds",
    "fallbacks", "actors": [{pool, actor, version, checksum, node_id, path, seconds,
    bytes, error}]}; "path" is "object_store", "nccl", "gloo" or "checkpoint_fallback".
    Raises WeightSyncError when an actor cannot be brought to `version` even by the
    fallback, StaleWeightsError (from require_version) if one still differs.
    """
    pools = _as_pools(pools)
    checkpoint_dir = os.fspath(checkpoint_dir)
    check_weight_sync_method(method, pools)
    t0 = time.perf_counter()
    for p in pools:  # target first: any later stage call re-syncs an actor that missed this
        p.set_target(version, checkpoint_dir)
    keys = [(pi, k) for pi, p in enumerate(pools) for k in range(len(p))]
    rows: dict[tuple[int, int], dict] = {}
    failed: dict[tuple[int, int], str] = {}
    nbytes = 0
    checksum = None

    collective_keys = [key for key in keys if method in COLLECTIVE and pools[key[0]].supports_collective]
    store_keys = [key for key in keys if key not in set(collective_keys)]
    restart_first: set = set()
    if collective_keys:
        done, bad, checksum, nbytes = _broadcast_collective(
            pools, collective_keys, checkpoint_dir, version, timeout_s, sender_resources, method
        )
        for key, (info, secs) in done.items():
            rows[key] = {**info, "path": method, "seconds": secs}
        failed.update(bad)
        restart_first = {k for k, why in bad.items() if why.startswith("timed out")}
    if store_keys:
        sd = load_checkpoint_state_dict(checkpoint_dir)
        checksum = state_dict_checksum(sd)
        nbytes = state_dict_nbytes(sd)
        ref = ray.put(pack_state_dict(sd))
        del sd
        calls = {
            pools[pi].actors[k].load_weights.remote(ref, version, checksum, checkpoint_dir): (pi, k)
            for pi, k in store_keys
        }
        done, bad = _wait(calls, timeout_s)
        for key, (info, secs) in done.items():
            rows[key] = {**info, "path": OBJECT_STORE, "seconds": secs}
        failed.update(bad)

    if failed:
        names = ", ".join(f"{pools[pi].labels[k]} ({why})" for (pi, k), why in sorted(failed.items()))
        logger.warning(
            "weight broadcast of version %d by %s: %d actor(s) fall back to reloading %s: %s",
            version, method, len(failed), checkpoint_dir, names,
        )
        for pi, k in restart_first:  # stuck in a collective: restart, then reload
            ray.kill(pools[pi].actors[k], no_restart=False)
        calls = {pools[pi].actors[k].reload_from_checkpoint.remote(checkpoint_dir, version): (pi, k) for pi, k in failed}
        done, bad = _wait(calls, fallback_timeout_s if fallback_timeout_s is not None else timeout_s)
        for key, (info, secs) in done.items():
            rows[key] = {**info, "path": CHECKPOINT_FALLBACK, "seconds": secs, "error": failed[key]}
        if bad:
            names = ", ".join(f"{pools[pi].labels[k]} ({why})" for (pi, k), why in sorted(bad.items()))
            raise WeightSyncError(f"weights version {version} from {checkpoint_dir} did not reach: {names}")

    for p in pools:
        p.require_version(version)
    actors = []
    for pi, k in keys:
        r = rows[(pi, k)]
        actors.append(
            {
                "pool": pools[pi].name,
                "actor": pools[pi].labels[k],
                "version": r["version"],
                "checksum": r["checksum"],
                "node_id": r["node_id"],
                "path": r["path"],
                "seconds": float(r["seconds"]),
                "bytes": int(r.get("bytes", nbytes)),
                "error": r.get("error"),
            }
        )
    return {
        "version": int(version),
        "method": method,
        "checkpoint": checkpoint_dir,
        "checksum": checksum,
        "bytes": int(nbytes),
        "seconds": time.perf_counter() - t0,
        "fallbacks": sum(a["path"] == CHECKPOINT_FALLBACK for a in actors),
        "actors": actors,
    }


# ===================================================================== collective path
# One route, two communicators: NCCL between GPUs (vLLM's PyNcclCommunicator over its
# StatelessProcessGroup, as in vLLM's RLHF example) and gloo between CPU processes (torch's
# ProcessGroupGloo over a TCPStore). The gloo twin runs the whole route here on CPU with
# vLLM's CPU backend (tests/test_vllm_engine.py); only the NCCL communicator needs a GPU.
# vllm is imported inside the functions only.


class _GlooCommunicator:
    """A broadcast-only gloo group outside torch.distributed's default world."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float):
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=float(timeout_s))
        self._store = dist.TCPStore(master_address, int(master_port), int(world_size), is_master=(int(rank) == 0),
                                    timeout=timeout, wait_for_workers=True)
        self._pg = dist.ProcessGroupGloo(self._store, int(rank), int(world_size), timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = int(src)
        self._pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self._pg = self._store = None


class _NcclCommunicator:
    """vLLM's PyNcclCommunicator over a StatelessProcessGroup whose store gives up after
    `timeout_s` (a missing rank raises, not hangs)."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float, device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=master_address, port=int(master_port), rank=int(rank),
                                          world_size=int(world_size), store_timeout=max(1, int(timeout_s)))
        self._comm = PyNcclCommunicator(pg, device=device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream())

    def destroy(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
        self._comm = None


def collective_communicator(backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                            timeout_s: float = 300.0, device=None):
    """A communicator of the weight-update group: "gloo" (CPU) or "nccl" (GPU, needs vLLM)."""
    if backend == GLOO:
        return _GlooCommunicator(master_address, master_port, rank, world_size, timeout_s)
    if backend == NCCL:
        return _NcclCommunicator(master_address, master_port, rank, world_size, timeout_s, device)
    raise ValueError(f"collective backend must be 'gloo' or 'nccl', got {backend!r}")


def _destroy(comm) -> None:
    """Free a communicator (one per update: a group left alive leaks NCCL/gloo resources)."""
    if comm is not None:
        comm.destroy()


class SPACollectiveWorkerExtension(SPAWorkerExtension):
    """vLLM worker extension: the backend's byte and checkpoint loads plus the collective
    receive. GeneratorActor(backend="vllm") passes this as ``worker_extension_cls``."""

    def spa_collective_init(self, backend: str, master_address: str, master_port: int, rank_offset: int,
                            world_size: int, timeout_s: float = 300.0) -> None:
        from vllm.distributed.parallel_state import get_world_group

        _destroy(getattr(self, "_spa_comm", None))  # a group a failed update left behind
        self._spa_comm = None
        rank = get_world_group().rank + int(rank_offset)
        self._spa_comm = collective_communicator(backend, master_address, master_port, rank, world_size, timeout_s,
                                                 self.device)

    def spa_collective_receive(self, metadata: list, version: int) -> dict:
        """Receive (name, dtype, shape) tensors in sorted-name order from rank 0, streamed
        into vLLM's in-place reload (no second copy of the model is held); returns
        {version, checksum, tensors} of what arrived. The group is destroyed afterwards."""
        state = self._spa_state()
        state["version"], state["checksum"] = None, None
        acc = ChecksumAccumulator()
        device = self.device if torch.device(self.device).type != "cpu" else "cpu"

        def received():
            for name, dtype_name, shape in metadata:
                buf = torch.empty(tuple(shape), dtype=getattr(torch, dtype_name), device=device)
                self._spa_comm.broadcast(buf, src=0)
                acc.update(name, buf)
                yield name, buf

        try:
            self.reload_weights(weights_iterator=received(), is_checkpoint_format=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        finally:
            _destroy(self._spa_comm)
            self._spa_comm = None
        state["version"], state["checksum"] = int(version), acc.hexdigest()
        return {"version": state["version"], "checksum": state["checksum"], "tensors": len(metadata)}


class CollectiveWeightSender:
    """Rank 0 of the weight-update group: a small actor holding the checkpoint (on its GPU
    for NCCL, in memory for gloo)."""

    def __init__(self, checkpoint_dir: str, backend: str = NCCL):
        self.backend = backend
        if backend == NCCL:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        sd = load_checkpoint_state_dict(checkpoint_dir)
        self.checksum = state_dict_checksum(sd)
        self.names = sorted(sd)
        self.tensors = {k: sd[k].to(self.device).contiguous() for k in self.names}
        self.comm = None

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def metadata(self) -> tuple[list, str, int]:
        meta = [(k, str(self.tensors[k].dtype).removeprefix("torch."), list(self.tensors[k].shape)) for k in self.names]
        nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return meta, self.checksum, int(nbytes)

    def init_group(self, master_address: str, master_port: int, world_size: int, timeout_s: float = 300.0) -> None:
        self.comm = collective_communicator(self.backend, master_address, master_port, 0, world_size, timeout_s,
                                            self.device)

    def send_all(self) -> int:
        try:
            for k in self.names:
                self.comm.broadcast(self.tensors[k], src=0)
            if self.backend == NCCL:
                torch.cuda.synchronize()
        finally:
            _destroy(self.comm)
            self.comm = None
        return len(self.names)


def _broadcast_collective(pools, keys, checkpoint_dir, version, timeout_s, sender_resources, backend):
    """Collective broadcast to the vLLM generators `keys`; returns (done, failed, checksum, bytes).

    A deadline on every step: the sender's start, the world-size query, the rendezvous
    (store timeout and ray.wait), every receive (the group's timeout, vLLM's RPC deadline
    and ray.wait). Collective calls are never retried by Ray. Whatever fails, the group is
    torn down and the actors are reported as timed out (restarted, then reloaded)."""
    if backend == NCCL:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise NcclUnavailableError("weight_sync.method='nccl' needs vLLM installed (pip install 'spa-ray[gpu]')") from exc
    opts: dict[str, Any] = {"num_gpus": 1 if backend == NCCL else 0, "num_cpus": 0, "max_restarts": 0}
    if sender_resources:
        opts["resources"] = dict(sender_resources)
    sender = ray.remote(CollectiveWeightSender).options(**opts).remote(checkpoint_dir, backend)
    try:
        meta, checksum, nbytes = ray.get(sender.metadata.remote(), timeout=timeout_s)
        sizes = ray.get([pools[pi].actors[k].collective_world_size.remote() for pi, k in keys], timeout=timeout_s)
        world_size = 1 + sum(sizes)
        host, port = ray.get(sender.address.remote(), timeout=timeout_s)
        offsets, off = [], 1
        for s in sizes:
            offsets.append(off)
            off += s
        # Collective calls are never retried by Ray: a retry on a restarted actor would join a
        # rendezvous whose store is gone and wait there. The fallback handles a failed actor.
        once = {"max_task_retries": 0}
        # group formation is a rendezvous: all ranks at once
        init = [sender.init_group.remote(host, port, world_size, timeout_s)] + [
            pools[pi].actors[k].collective_init_group.options(**once).remote(backend, host, port, o, world_size, timeout_s)
            for (pi, k), o in zip(keys, offsets)
        ]
        ready, _ = ray.wait(init, num_returns=len(init), timeout=timeout_s)
        if len(ready) < len(init):
            raise TimeoutError(f"{backend} group formation timed out after {timeout_s} s")
        ray.get(init)
        recv = {
            pools[pi].actors[k].collective_receive.options(**once).remote(meta, version, checksum, checkpoint_dir): (pi, k)
            for pi, k in keys
        }
        send = sender.send_all.remote()
        done, failed = _wait(recv, timeout_s)
        try:
            ray.get(send, timeout=1.0 if failed else timeout_s)
        except Exception as exc:  # the receivers' results say who got what
            logger.warning("%s weight sender did not finish cleanly: %s", backend, exc)
        return done, failed, checksum, nbytes
    except Exception as exc:
        if isinstance(exc, NcclUnavailableError):
            raise
        reason = f"{backend} setup failed: {type(exc).__name__}: {exc}"
        logger.warning("%s", reason)
        # receivers may be stuck in a rendezvous or collective: treat as timed out (restart, reload)
        sd = load_checkpoint_state_dict(checkpoint_dir)
        return {}, {key: f"timed out ({reason})" for key in keys}, state_dict_checksum(sd), state_dict_nbytes(sd)
    finally:
        ray.kill(sender, no_restart=True)
