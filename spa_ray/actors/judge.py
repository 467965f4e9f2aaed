"""JudgeActor: SPA's direct preference judgment (Eq. 7, 8, 13) as a Ray actor shell.

It holds pi_{t-1} (the policy, updated by each broadcast) and the judge reference
(pi_init by default; None for the "none" option; ``set_reference`` for "previous").
All numbers come from ``judging.pair_labels`` (scoring, Eq. 7-8) and
``evaluation.win_rates.implicit_reward_accuracy``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from spa_ray.actors.base import WeightedActor, copy_and_verify, model_checksum
from spa_ray.evaluation.win_rates import implicit_reward_accuracy
from spa_ray.judging.pair_labels import label_pair_rows, pair_rewards
from spa_ray.models.loading import checkpoint_tensor_names, load_causal_lm, load_tokenizer
from spa_ray.weights.errors import WeightsMismatchError
from spa_ray.models.scoring import DEFAULT_MAX_TOKENS_PER_BATCH

__all__ = ["JudgeActor", "label_rows", "gold_accuracy"]

_UNSET = object()


class JudgeActor(WeightedActor):
    """Labels response pairs with the implicit reward of pi_{t-1} against a reference.

    Args:
        policy_path: checkpoint of pi_{t-1} at `version` (its tokenizer gives the pad id).
        reference_path: the judge reference (pi_init), or None for reference "none".
        beta, length_penalty: Eq. 7 and Eq. 13 (|y| = response tokens, EOS included).
        max_tokens_per_batch: token budget of one length-bucketed forward.
        device, dtype: where the two models run.
    """

    def __init__(
        self,
        policy_path: str | os.PathLike,
        reference_path: str | os.PathLike | None = None,
        version: int = 0,
        beta: float = 0.1,
        length_penalty: float = 0.0,
        max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
        device: str = "cpu",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        pad_token_id: int | None = None,
        num_threads: int | None = None,
        label: str | None = None,
    ):
        if num_threads:
            torch.set_num_threads(int(num_threads))
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self.beta, self.length_penalty = float(beta), float(length_penalty)
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        self.policy = load_causal_lm(policy_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self._names = checkpoint_tensor_names(policy_path)
        self.reference = None
        self._reference_path = None
        self._load_reference(reference_path)
        if pad_token_id is None:
            tok = load_tokenizer(policy_path, trust_remote_code=trust_remote_code, require_chat_template=False)
            pad_token_id = tok.pad_token_id
        self.pad_token_id = int(pad_token_id)
        self._init_weights_state(label, policy_path, version)

    # -- reference ---------------------------------------------------------------------
    def _load_reference(self, path) -> None:
        if path is None:
            self.reference = None
        else:
            self.reference = load_causal_lm(path, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code)
        self._reference_path = os.fspath(path) if path is not None else None

    def set_reference(self, path: str | os.PathLike | None) -> None:
        """Replace the judge reference (reference='previous'); None = no reference."""
        self._load_reference(path)

    def _sync_extra(self, state: Mapping) -> None:
        ref = state.get("reference_path", _UNSET)
        if ref is not _UNSET and ref != self._reference_path:
            self._load_reference(ref)

    # -- scoring ----------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self._version is None:
            raise WeightsMismatchError(f"{self.actor_label}: weights are in an unknown state (a load failed); reload first")

    def _rewards(self, prompt_ids: Sequence, first: Sequence, second: Sequence):
        return pair_rewards(self.policy, self.reference, prompt_ids, first, second, pad_token_id=self.pad_token_id,
                            beta=self.beta, length_penalty=self.length_penalty,
                            max_tokens_per_batch=self.max_tokens_per_batch)

    def label(self, rows: list[dict]) -> list[dict]:
        """Eq. 7-8 labels (``judging.pair_labels.label_pair_rows``: the fields it returns)."""
        self._check_ready()
        return label_pair_rows(self.policy, self.reference, rows, pad_token_id=self.pad_token_id, beta=self.beta,
                               length_penalty=self.length_penalty, max_tokens_per_batch=self.max_tokens_per_batch,
                               version=self._version)

    def gold_rewards(self, rows: list[dict]) -> list[dict]:
        """Implicit rewards of gold pairs (prompt_ids, chosen_ids, rejected_ids)."""
        self._check_ready()
        n = len(rows)
        if n == 0:
            return []
        _, _, r = self._rewards(
            [row["prompt_ids"] for row in rows],
            [row["chosen_ids"] for row in rows],
            [row["rejected_ids"] for row in rows],
        )
        return [{"reward_chosen": float(r[i]), "reward_rejected": float(r[n + i])} for i in range(n)]

    def gold_accuracy(self, rows: list[dict]) -> float:
        """Judge health check: fraction of gold pairs with r(chosen) > r(rejected), ties half."""
        rewards = self.gold_rewards(rows)
        return implicit_reward_accuracy(
            [x["reward_chosen"] for x in rewards], [x["reward_rejected"] for x in rewards]
        )

    # -- weights -------------------------------------------------------------------------
    def _load_verified(self, state_dict, version, checksum) -> str:
        got = copy_and_verify(self.policy, state_dict, checksum, self.actor_label)
        self._names = sorted(state_dict)
        return got

    def _live_checksum(self) -> str:
        return model_checksum(self.policy, self._names)

    def weights_info(self) -> dict:
        return {**super().weights_info(), "reference_path": self._reference_path}


def label_rows(pool, rows: list[dict]) -> list[dict]:
    """Label over a ShardedActors pool of JudgeActors; one label per row, in row order."""
    out = pool.map_shards("label", list(rows))
    if len(out) != len(rows):
        raise RuntimeError(f"judging over {pool.name} returned {len(out)} labels for {len(rows)} rows")
    return out


def gold_accuracy(pool, rows: list[dict]) -> float:
    """The judge health check over a pool (rewards sharded, accuracy over all rows)."""
    rewards = pool.map_shards("gold_rewards", list(rows))
    return implicit_reward_accuracy([x["reward_chosen"] for x in rewards], [x["reward_rejected"] for x in rewards])
