"""Weights as data: packed state dicts for Ray's object store, byte records for vLLM's RPC.

- ``PackedStateDict``: numpy arrays (bfloat16 as raw 16-bit words), so that readers on
  the same node map an object-store copy zero-copy instead of unpickling tensor bytes.
- Records ``(name, dtype name, shape, raw bytes)``: what vLLM's RPC messages can carry
  (they cannot carry torch tensors), sent in bounded chunks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PackedStateDict",
    "pack_state_dict",
    "unpack_state_dict",
    "resolve_state_dict",
    "state_dict_nbytes",
    "iter_state_dict_chunks",
    "tensor_to_record",
    "record_to_tensor",
]


# torch dtypes numpy cannot hold natively travel as same-width integer words
_VIEW_AS = {torch.bfloat16: torch.int16}


@dataclass
class PackedStateDict:
    """A state dict as numpy arrays (zero-copy through Ray's object store)."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]  # name -> torch dtype name, e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> PackedStateDict:
    arrays, dtypes = {}, {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor ({type(t).__name__})")
        t = t.detach().to("cpu").contiguous()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        if t.dtype in _VIEW_AS:
            t = t.view(_VIEW_AS[t.dtype])
        arrays[name] = t.numpy()
    return PackedStateDict(arrays, dtypes)


def unpack_state_dict(packed: PackedStateDict) -> dict[str, torch.Tensor]:
    """Tensors viewing the packed arrays (read-only memory: copy them into a model)."""
    out = {}
    with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        for name, arr in packed.arrays.items():
            t = torch.from_numpy(arr)
            dtype = getattr(torch, packed.dtypes[name])
            out[name] = t.view(dtype) if t.dtype != dtype else t
    return out


def resolve_state_dict(state) -> Mapping[str, torch.Tensor]:
    """A tensor mapping from a mapping, a PackedStateDict, or an ObjectRef to either."""
    import ray

    if isinstance(state, ray.ObjectRef):
        state = ray.get(state)
    if isinstance(state, PackedStateDict):
        return unpack_state_dict(state)
    if isinstance(state, Mapping):
        return state
    raise TypeError(f"expected a state dict, PackedStateDict or ObjectRef, got {type(state).__name__}")


def state_dict_nbytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state_dict.values()))


def iter_state_dict_chunks(
    state_dict: Mapping[str, torch.Tensor], max_bytes: int = 1 << 28
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, CPU tensor) lists of at most `max_bytes` each (a bigger tensor goes alone)."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor")
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t.detach().to("cpu").contiguous()))
        size += nbytes
    if chunk:
        yield chunk


def tensor_to_record(name: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """(name, dtype name, shape, raw bytes): what vLLM's RPC can carry for one tensor."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), data


def record_to_tensor(record: Sequence) -> tuple[str, torch.Tensor]:
    """Inverse of ``tensor_to_record`` (a fresh, writable tensor)."""
    name, dtype_name, shape, data = record
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight record {name!r}: unknown dtype {dtype_name!r}")
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    want = numel * torch.empty(0, dtype=dtype).element_size()
    if len(data) != want:
        raise ValueError(f"weight record {name!r}: {len(data)} bytes for {dtype_name}{list(shape)}, expected {want}")
    if not numel:
        return str(name), torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return str(name), flat.view(dtype).reshape(shape)
