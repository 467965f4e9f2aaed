"""Sequence log-probs log pi(y|x) for many (prompt, response) pairs, batched by length.

Layout (docs/dev/CONTRACT.md): each sequence is ``prompt_ids + response_ids``, RIGHT-padded
with ``pad_token_id``; ``attention_mask`` is 1 on real tokens; ``response_mask`` is True
exactly on the response tokens. The sum over response tokens is
``spa_ray.objectives.logprobs.sequence_logprobs`` (which does the shift).

Bucketing: sequences are sorted by total length (longest first) and packed greedily
into batches whose padded size ``rows * longest`` stays within ``max_tokens_per_batch``
(a sequence longer than the budget gets a batch of its own). Neighbours in sorted order
have similar lengths, so little compute goes to padding. Results come back in INPUT
order whatever the bucketing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spa_ray.data.collate import bucket_by_length

from spa_ray.objectives.logprobs import sequence_logprobs

__all__ = ["length_buckets", "collate_right_padded", "batched_sequence_logprobs", "batched_policy_reference_logprobs"]

DEFAULT_MAX_TOKENS_PER_BATCH = 4096


def length_buckets(
    lengths: Sequence[int], max_tokens_per_batch: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches, longest first, ``len(batch) * max_len <= budget``
    (the data layer's bucketing; every index appears exactly once)."""
    return bucket_by_length(lengths, max_tokens_per_batch, max_batch_size=max_batch_size)


def _check_pairs(prompt_ids, response_ids) -> list[int]:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"prompt_ids and response_ids must have the same length, got {len(prompt_ids)} and {len(response_ids)}"
        )
    lengths = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError(f"pair {i}: empty prompt (the first response token needs a token before it)")
        if len(r) == 0:
            raise ValueError(f"pair {i}: empty response (log pi(y|x) of an empty y is not scored)")
        lengths.append(len(p) + len(r))
    return lengths


def collate_right_padded(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T] long, response_mask [B, T] bool), right-padded."""
    B = len(prompt_ids)
    T = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n_p, n = len(p), len(p) + len(r)
        input_ids[b, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[b, :n] = 1
        response_mask[b, n_p:n] = True
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _EvalMode:
    """Context manager: eval() for the duration, then restore the previous mode."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]
        self.was_training = [m.training for m in self.models]

    def __enter__(self):
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, t in zip(self.models, self.was_training):
            m.train(t)


def _forward_logprobs(model, input_ids, attention_mask, response_mask, device) -> torch.Tensor:
    dev = torch.device(device) if device is not None else _model_device(model)
    ids, am, rm = input_ids.to(dev), attention_mask.to(dev), response_mask.to(dev)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    out = sequence_logprobs(logits, ids, rm)
    return out.float().cpu()


@torch.no_grad()
def batched_policy_reference_logprobs(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    max_batch_size: int | None = None,
    policy_device: str | torch.device | None = None,
    reference_device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi_policy(y|x) [N], log pi_ref(y|x) [N] or None) in one pass over the buckets.

    Each bucket is collated once and run through both models (each on its own device;
    default: the device its parameters are on). For the judge (Eq. 7): policy = pi_{t-1},
    reference = pi_init, or None for the "no reference" option. float32, on CPU, INPUT
    order. Models are put in eval mode for the call and restored afterwards.
    """
    lengths = _check_pairs(prompt_ids, response_ids)
    n = len(lengths)
    pol = torch.empty(n, dtype=torch.float32)
    ref = torch.empty(n, dtype=torch.float32) if reference is not None else None
    if n == 0:
        return pol, ref
    with _EvalMode(policy, reference):
        for batch in length_buckets(lengths, max_tokens_per_batch, max_batch_size):
            ids, am, rm = collate_right_padded(
                [prompt_ids[i] for i in batch], [response_ids[i] for i in batch], pad_token_id
            )
            index = torch.tensor(batch, dtype=torch.long)
            pol[index] = _forward_logprobs(policy, ids, am, rm, policy_device)
            if reference is not None:
                ref[index] = _forward_logprobs(reference, ids, am, rm, reference_device)
    return pol, ref


def batched_sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    device: str | torch.device | None = None,
    max_batch_size: int | None = None,
) -> torch.Tensor:
    """log pi(y_i|x_i) for every pair, float32 [N] on CPU, in INPUT order.

    prompt_ids[i] + response_ids[i] is scored with teacher forcing; only response tokens
    count (the sum includes an EOS token if the response carries one). Empty prompts or
    responses raise ValueError. One no_grad forward per length bucket.
    """
    pol, _ = batched_policy_reference_logprobs(
        model,
        None,
        prompt_ids,
        response_ids,
        pad_token_id,
        max_tokens_per_batch=max_tokens_per_batch,
        max_batch_size=max_batch_size,
        policy_device=device,
    )
    return pol
