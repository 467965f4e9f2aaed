"""Token and sequence log-probabilities from causal-LM logits (teacher forcing).

`logits[:, t]` predicts `input_ids[:, t+1]`, so the functions shift internally and callers
never do. A sequence log-prob is the sum over *response* tokens only (SPA.md): prompt and
padding contribute nothing, whatever values sit there (ids such as -100 included).

Memory: a float32 `log_softmax` of the whole [B, T, V] tensor would double the largest
activation of the step (more for bf16 logits, which must be upcast for accuracy). We
instead loop over rows and use `gather(logit) - logsumexp(logits)`, so the extra memory
is one row's [T, V] in float32 at a time. bf16/fp16 logits are computed in float32;
float64 stays float64 (the tests' references use it).
"""

from __future__ import annotations

import torch

from ._checks import as_bool_mask, rows


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (accuracy), otherwise the input's own float type."""
    return torch.promote_types(dtype, torch.float32)


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., ids] without materialising the full log_softmax.

    `logits` [..., V] must already be in the compute dtype; `ids` [...] valid indices.
    """
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def validate_sequence_inputs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor | None,
    logits_name: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes/dtypes and return (target_mask [B, T-1] bool, safe target ids [B, T-1]).

    target_mask[b, t] says whether input_ids[b, t+1] is a response token; ids at other
    positions are replaced by 0 so arbitrary pad/prompt ids never reach `gather`.
    With response_mask None every next token counts.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{logits_name} must be a 3-D tensor [B, T, V], got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{logits_name} must be floating point, got dtype {logits.dtype}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor [B, T], got {shape}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"shape mismatch: {logits_name} {tuple(logits.shape)} must be [B, T, V] with [B, T] "
            f"equal to input_ids {tuple(input_ids.shape)}"
        )
    B, T, V = logits.shape
    if T < 2:
        raise ValueError(f"sequences must have at least 2 tokens to score a response, got T={T}")
    if response_mask is None:
        target_mask = torch.ones(B, T - 1, dtype=torch.bool, device=input_ids.device)
    else:
        if not isinstance(response_mask, torch.Tensor) or tuple(response_mask.shape) != tuple(input_ids.shape):
            shape = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
            raise ValueError(
                f"shape mismatch: response_mask {shape} must equal input_ids {tuple(input_ids.shape)}"
            )
        mask = as_bool_mask("response_mask", response_mask)
        first = mask[:, 0]
        if bool(first.any()):
            raise ValueError(
                "response_mask marks position 0 as a response token in rows "
                f"{rows(first)}; no logit predicts the first token (a response needs a prompt/BOS before it)"
            )
        target_mask = mask[:, 1:]
        empty = ~target_mask.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"response_mask has no response token in rows {rows(empty)}")
    targets = input_ids[:, 1:]
    bad = target_mask & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(
            f"input_ids hold response token ids outside [0, {V}) (vocabulary of {logits_name}) "
            f"in rows {rows(bad.any(dim=1))}"
        )
    safe_ids = torch.where(target_mask, targets, torch.zeros_like(targets))
    return target_mask, safe_ids


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token log pi(input_ids[:, t+1] | input_ids[:, :t+1]) -> [B, T-1].

    With `response_mask`, positions whose target is not a response token are exactly 0
    (and their ids are never looked up). Differentiable w.r.t. `logits`.
    """
    target_mask, ids = validate_sequence_inputs(logits, input_ids, response_mask)
    dtype = compute_dtype(logits.dtype)
    out = []
    for b in range(logits.shape[0]):  # one row at a time: peak extra memory [T, V]
        row = logits[b, :-1].to(dtype)
        out.append(gather_logprobs(row, ids[b]))
    lp = torch.stack(out, dim=0)
    return torch.where(target_mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum of response-token log-probs -> [B] (float32, or float64 for float64 logits).

    ValueError on shape mismatch, a non-0/1 mask, or a row with no response token.
    """
    if response_mask is None:
        raise ValueError("response_mask is required for sequence_logprobs (prompt and padding must be excluded)")
    return token_logprobs(logits, input_ids, response_mask).sum(dim=-1)


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """|y| in tokens per row -> LongTensor [B] (counts tokens that a logit predicts, i.e. positions >= 1)."""
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        shape = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
        raise ValueError(f"response_mask must be a 2-D tensor [B, T], got {shape}")
    return as_bool_mask("response_mask", response_mask)[:, 1:].sum(dim=1)
