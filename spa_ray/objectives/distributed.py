"""All-gather of variable-size 1-D tensors across data-parallel ranks.

The confidence window must see every rank's samples (see confidence_window.py). Ranks may
hold different batch sizes (the last batch of an epoch), and `dist.all_gather` needs equal
sizes, so we exchange sizes first, pad to the largest, gather, and trim. The result is the
concatenation in rank order, identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_1d(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor` [n_r] from all ranks (rank order) -> [sum n_r]; identity if dist is not initialised.

    It is a collective: every rank of `group` must call it, even with an empty tensor.
    The tensor must live on a device the backend supports (CUDA for NCCL, CPU for gloo).
    """
    if tensor.dim() != 1:
        raise ValueError(f"tensor must be 1-D, got shape {tuple(tensor.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    size = torch.tensor([tensor.numel()], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([buf[:n] for buf, n in zip(buffers, counts)])
