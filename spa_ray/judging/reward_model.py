"""An external reward model as the judge (SPA's Table 2 baseline "Iterative DPO, PairRM").

A scalar-head scorer ``r(x, y)``: a causal LM backbone whose last hidden state at the
last real token of ``prompt + response`` goes through a linear head to one number
(transformers' ``*ForSequenceClassification`` with ``num_labels=1``, pooled here from
the attention mask rather than from pad ids). It is trained with the Bradley-Terry loss
``-log sigma(r(x, y_w) - r(x, y_l))`` on gold pairs and then orders a pair of samples by
``p(y1 > y2) = sigma(r1 - r2)`` (the labels come from ``implicit_reward.label_pairs``).

The judge in the paper is PairRM, trained on ~500K pairs of other data; the project's
stand-in (``judging.judge_models.train_reward_model``) is trained on many gold pairs of
the task's demonstration distribution: like PairRM, it has seen plenty of labels, but
not from the policy's own samples, so it meets a shifted distribution when it judges.

Pure torch: no Ray, no I/O. Everything a judge returns is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives._checks import as_bool_mask, check_1d, check_floating, check_same_shape, rows

__all__ = ["bradley_terry_loss", "last_token_scores", "scalar_rewards"]


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair ``-log sigma(r_w - r_l)`` [B] (not reduced); differentiable."""
    check_same_shape(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    check_1d("reward_chosen", reward_chosen)
    check_floating(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    return F.softplus(-(reward_chosen - reward_rejected))


def last_token_scores(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at each row's last attended position: [B, T] scores, [B, T] mask -> [B].

    Works for right and left padding (the last position whose mask is 1). A row with no
    attended token raises ValueError naming the rows.
    """
    if token_scores.dim() == 3 and token_scores.shape[-1] == 1:
        token_scores = token_scores.squeeze(-1)
    check_same_shape(token_scores=token_scores, attention_mask=attention_mask)
    if token_scores.dim() != 2:
        raise ValueError(f"token_scores must be [B, T] (or [B, T, 1]), got {tuple(token_scores.shape)}")
    mask = as_bool_mask("attention_mask", attention_mask)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"attention_mask has no attended token in rows {rows(empty)}")
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    return token_scores[torch.arange(token_scores.shape[0], device=token_scores.device), last]


def scalar_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) [B] of a ``*ForSequenceClassification`` model (``num_labels=1``).

    Backbone (``model.<base_model_prefix>``) -> ``model.score`` on every position ->
    the last attended position. Differentiable (wrap in no_grad to judge).
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    scores = model.score(hidden)
    if scores.shape[-1] != 1:
        raise ValueError(f"the reward head must have one output, got {scores.shape[-1]} (num_labels=1)")
    return last_token_scores(scores.squeeze(-1), attention_mask).float()
