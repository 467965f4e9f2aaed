"""The weights' side of a vLLM engine: a worker extension that runs inside vLLM's workers.

vLLM mixes ``SPAWorkerExtension`` into its worker class (``worker_extension_cls``); the
generator calls its methods through ``LLM.collective_rpc`` with plain arguments only.
Importing this module does not import vLLM.
"""

from __future__ import annotations

import torch

from spa_ray.models.loading import ChecksumAccumulator, load_checkpoint_state_dict, state_dict_checksum
from spa_ray.weights.collective import collective_communicator, destroy_communicator
from spa_ray.weights.packing import record_to_tensor

__all__ = ["SPAWorkerExtension", "WORKER_EXTENSION_CLS"]

WORKER_EXTENSION_CLS = "spa_ray.weights.vllm_worker.SPAWorkerExtension"


class SPAWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the workers.

    Three ways in: byte records in chunks (``spa_update_*``), the checkpoint folder read
    here (``spa_reload_from_path``), and a collective group's broadcast (``spa_collective_*``,
    NCCL or gloo). All end in vLLM's in-place ``reload_weights``.

    vLLM adds these methods to its worker (GPU or CPU), so ``self.reload_weights`` is
    the worker's in-place reload. Called through ``LLM.collective_rpc`` with plain
    arguments only. Each worker keeps the (version, checksum) of what it last loaded:
    that is what the engine reports, not what the caller believes it sent.
    """

    def _spa_state(self) -> dict:
        state = getattr(self, "_spa_weights", None)
        if state is None:
            state = self._spa_weights = {"version": 0, "checksum": None, "pending": None}
        return state

    def _spa_reload(self, named: dict[str, torch.Tensor], version: int) -> dict:
        state = self._spa_state()
        state["version"], state["checksum"] = None, None  # unknown until the reload returns
        checksum = state_dict_checksum(named)
        self.reload_weights(weights_iterator=iter(sorted(named.items())), is_checkpoint_format=True)
        state["version"], state["checksum"] = int(version), checksum
        return {"version": state["version"], "checksum": checksum, "tensors": len(named)}

    def spa_update_begin(self, version: int) -> None:
        """Start receiving a new weights version in chunks (a previous partial one is dropped)."""
        state = self._spa_state()
        state["pending"] = {"version": int(version), "tensors": {}}

    def spa_update_chunk(self, records: list) -> int:
        """Rebuild one chunk of (name, dtype, shape, bytes) records; returns tensors held."""
        pending = self._spa_state()["pending"]
        if pending is None:
            raise RuntimeError("spa_update_chunk before spa_update_begin")
        for record in records:
            name, t = record_to_tensor(record)
            pending["tensors"][name] = t
        return len(pending["tensors"])

    def spa_update_finish(self, version: int) -> dict:
        """Load the received tensors in place; returns {version, checksum, tensors}."""
        state = self._spa_state()
        pending, state["pending"] = state["pending"], None
        if pending is None or pending["version"] != int(version):
            raise RuntimeError(f"spa_update_finish({version}) without a matching spa_update_begin")
        return self._spa_reload(pending["tensors"], version)

    def spa_reload_from_path(self, path: str, version: int) -> dict:
        """Read the safetensors folder here and reload in place (checksum of the files)."""
        return self._spa_reload(load_checkpoint_state_dict(path), version)

    def spa_mark_built(self, version: int) -> dict:
        """A new engine built from a checkpoint that is weights `version`: report it so."""
        state = self._spa_state()
        state["version"], state["checksum"] = int(version), None
        info = self.spa_weights_info()
        return {**info, "tensors": None}

    def spa_weights_info(self) -> dict:
        """(version, checksum) held; as built, the checksum of the folder it was built from."""
        state = self._spa_state()
        if state["checksum"] is None and state["version"] is not None:
            try:
                state["checksum"] = state_dict_checksum(load_checkpoint_state_dict(self.vllm_config.model_config.model))
            except FileNotFoundError:  # built from a hub id: nothing local to fingerprint
                pass
        return {"version": state["version"], "checksum": state["checksum"]}

    def spa_collective_init(self, backend: str, master_address: str, master_port: int, rank_offset: int,
                            world_size: int, timeout_s: float = 300.0) -> None:
        from vllm.distributed.parallel_state import get_world_group

        destroy_communicator(getattr(self, "_spa_comm", None))  # a group a failed update left behind
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
            destroy_communicator(self._spa_comm)
            self._spa_comm = None
        state["version"], state["checksum"] = int(version), acc.hexdigest()
        return {"version": state["version"], "checksum": state["checksum"], "tensors": len(metadata)}
