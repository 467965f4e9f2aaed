"""The collective weight route: a sender and every vLLM worker in one group, a broadcast.

One route, two communicators: NCCL between GPUs (vLLM's PyNcclCommunicator over its
StatelessProcessGroup, as in vLLM's RLHF example) and gloo between CPU processes (torch's
ProcessGroupGloo over a TCPStore). The gloo twin runs the whole route here on CPU with
vLLM's CPU backend (tests/test_vllm_engine.py); only the NCCL communicator needs a GPU.
vllm is imported inside the functions only.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import ray
import torch

from spa_ray.models.loading import load_checkpoint_state_dict, state_dict_checksum
from spa_ray.weights.calls import wait_calls
from spa_ray.weights.errors import NcclUnavailableError
from spa_ray.weights.packing import state_dict_nbytes

__all__ = ["NCCL", "GLOO", "COLLECTIVE", "collective_communicator", "destroy_communicator", "CollectiveWeightSender",
           "broadcast_collective"]

logger = logging.getLogger(__name__)

NCCL = "nccl"
GLOO = "gloo"
COLLECTIVE = (NCCL, GLOO)


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


def destroy_communicator(comm) -> None:
    """Free a communicator (one per update: a group left alive leaks NCCL/gloo resources)."""
    if comm is not None:
        comm.destroy()


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
            destroy_communicator(self.comm)
            self.comm = None
        return len(self.names)


def broadcast_collective(pools, keys, checkpoint_dir, version, timeout_s, sender_resources, backend):
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
        done, failed = wait_calls(recv, timeout_s)
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
