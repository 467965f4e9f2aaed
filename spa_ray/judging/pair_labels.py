"""Eq. 7-8 labels of response pairs from two loaded models: what a judge computes.

One function for every place that judges: the judge actors (``actors/judge.py``) and the
trainer group's ranks when the judge runs on them (``judge.on_trainer``). No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spa_ray.judging.implicit_reward import implicit_reward, label_pairs
from spa_ray.models.scoring import batched_policy_reference_logprobs, batched_sequence_logprobs

__all__ = ["pair_rewards", "label_pair_rows"]


def pair_rewards(policy: torch.nn.Module, reference: torch.nn.Module | None, prompt_ids: Sequence,
                 first: Sequence, second: Sequence, *, pad_token_id: int, beta: float, length_penalty: float,
                 max_tokens_per_batch: int, policy_logps: Sequence[float] | None = None):
    """Log-probs and rewards of (prompt, first[i]) and (prompt, second[i]) in one pass:
    (policy log-probs [2n], reference log-probs [2n] or None, rewards [2n], firsts then seconds).

    ``policy_logps`` (2n floats), when given, are the generator's own log pi_{t-1}(y|x) and
    replace the policy forward (judge.reuse_generator_logprobs)."""
    prompts = list(prompt_ids) + list(prompt_ids)
    responses = list(first) + list(second)
    if policy_logps is None:
        pol, ref = batched_policy_reference_logprobs(policy, reference, prompts, responses, pad_token_id,
                                                     max_tokens_per_batch=max_tokens_per_batch)
    else:
        pol = torch.tensor(list(policy_logps), dtype=torch.float32)
        ref = None
        if reference is not None:
            ref = batched_sequence_logprobs(reference, prompts, responses, pad_token_id,
                                            max_tokens_per_batch=max_tokens_per_batch)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    rewards = implicit_reward(pol, ref, beta, response_lengths=lengths, length_penalty=length_penalty)
    return pol, ref, rewards


def label_pair_rows(policy: torch.nn.Module, reference: torch.nn.Module | None, rows: list[dict], *,
                    pad_token_id: int, beta: float, length_penalty: float, max_tokens_per_batch: int,
                    version: int | None) -> list[dict]:
    """Eq. 7-8 labels for rows with prompt_ids, response_ids_1, response_ids_2 (and optionally
    policy_logp_1/2: the generator's log pi_{t-1}, skipping that forward).

    Returns per row: logp_policy_1/2, logp_ref_1/2 (None without a reference), reward_1/2,
    probability (= sigma(r1 - r2), in the given order), first_is_chosen, is_tie, judge_version."""
    n = len(rows)
    if n == 0:
        return []
    given = None
    if all(row.get("policy_logp_1") is not None and row.get("policy_logp_2") is not None for row in rows):
        given = [row["policy_logp_1"] for row in rows] + [row["policy_logp_2"] for row in rows]
    pol, ref, r = pair_rewards(
        policy, reference, [row["prompt_ids"] for row in rows], [row["response_ids_1"] for row in rows],
        [row["response_ids_2"] for row in rows], pad_token_id=pad_token_id, beta=beta,
        length_penalty=length_penalty, max_tokens_per_batch=max_tokens_per_batch, policy_logps=given,
    )
    labels = label_pairs(r[:n], r[n:])
    return [
        {
            "logp_policy_1": float(pol[i]),
            "logp_policy_2": float(pol[n + i]),
            "logp_ref_1": float(ref[i]) if ref is not None else None,
            "logp_ref_2": float(ref[n + i]) if ref is not None else None,
            "reward_1": float(r[i]),
            "reward_2": float(r[n + i]),
            "probability": float(labels.probability[i]),
            "first_is_chosen": bool(labels.first_is_chosen[i]),
            "is_tie": bool(labels.is_tie[i]),
            "judge_version": version,
        }
        for i in range(n)
    ]
