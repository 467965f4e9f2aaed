"""Bringing every generator and judge actor to a new weights version, with a fallback.

``broadcast_weights(pools, checkpoint_dir, version, method, timeout_s, weights=None)``:

- ``object_store`` (CPU and GPU): the trainer's published copy (``weights``, a
  WeightsHandle) when the caller has one; else the caller reads the safetensors
  checkpoint ONCE (CPU), packs it as numpy arrays and ``ray.put``s it ONCE; every actor's ``load_weights`` gets
  the same ObjectRef (same-node readers map it zero-copy) and verifies the checksum after
  loading. The calls are awaited with ``ray.wait(timeout=timeout_s)``.
- ``nccl`` (GPU) and ``gloo`` (CPU), vLLM generators only: a sender actor loads the
  checkpoint (onto its GPU for nccl) and forms a group with every vLLM worker of every
  generator (rank 0 = sender, then each engine's workers, counted from the running engine),
  then broadcasts each tensor in sorted-name order; the workers stream what they receive
  into vLLM's in-place ``reload_weights`` and report the checksum of what arrived
  (``weights.vllm_worker.SPAWorkerExtension``). NCCL is vLLM's PyNcclCommunicator (its RLHF example's
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
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ray

from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum
from spa_ray.weights.calls import wait_calls
from spa_ray.weights.collective import COLLECTIVE, NCCL, broadcast_collective
from spa_ray.weights.errors import NcclUnavailableError, WeightSyncError
from spa_ray.weights.packing import pack_state_dict, state_dict_nbytes

__all__ = ["broadcast_weights", "check_weight_sync_method", "OBJECT_STORE", "CHECKPOINT_FALLBACK"]

logger = logging.getLogger(__name__)

OBJECT_STORE = "object_store"
CHECKPOINT_FALLBACK = "checkpoint_fallback"


def _as_pools(pools) -> list:
    """One pool (anything with ``actors``) or a sequence of them."""
    return [pools] if hasattr(pools, "actors") else list(pools)


def check_weight_sync_method(method: str, pools: Iterable | None = None, generation_backend: str | None = None) -> None:
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
    pools: Any | Sequence[Any],
    checkpoint_dir: str | os.PathLike,
    version: int,
    method: str = OBJECT_STORE,
    timeout_s: float = 600.0,
    fallback_timeout_s: float | None = None,
    sender_resources: dict | None = None,
    weights: Any = None,
) -> dict[str, Any]:
    """Bring every actor of `pools` to the weights in `checkpoint_dir` as `version`.

    ``weights``: a WeightsHandle of the same tensors already in the object store (the
    trainer's rank 0 published them): the object-store route sends it instead of reading
    the checkpoint. If its owner is gone, the actors fall back to the checkpoint.

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
        done, bad, checksum, nbytes = broadcast_collective(
            pools, collective_keys, checkpoint_dir, version, timeout_s, sender_resources, method
        )
        for key, (info, secs) in done.items():
            rows[key] = {**info, "path": method, "seconds": secs}
        failed.update(bad)
        restart_first = {k for k, why in bad.items() if why.startswith("timed out")}
    if store_keys:
        if weights is not None:  # from memory: no read of the checkpoint
            ref, checksum, nbytes = weights.ref, weights.checksum, weights.nbytes
        else:
            sd = load_checkpoint_state_dict(checkpoint_dir)
            checksum = state_dict_checksum(sd)
            nbytes = state_dict_nbytes(sd)
            ref = ray.put(pack_state_dict(sd))
            del sd
        calls = {
            pools[pi].actors[k].load_weights.remote(ref, version, checksum, checkpoint_dir): (pi, k)
            for pi, k in store_keys
        }
        done, bad = wait_calls(calls, timeout_s)
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
        done, bad = wait_calls(calls, fallback_timeout_s if fallback_timeout_s is not None else timeout_s)
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
        "from_memory": bool(store_keys) and weights is not None,
        "actors": actors,
    }


