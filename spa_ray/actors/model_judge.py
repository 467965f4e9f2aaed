"""ModelJudgeActor: a swapped judge (reward model or LLM-as-judge) as a thin Ray actor.

The judge model is trained once per run (``pipeline.stages.prepare_judge_model``) and
never changes afterwards, so the pool holds one version (0) for the whole run; it still
goes through ``WeightedActor`` so a restarted actor is checked like every other one.
All numbers come from ``judging.judge_models.judge_rows``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from spa_ray.actors.base import WeightedActor, copy_and_verify, model_checksum
from spa_ray.models.loading import checkpoint_tensor_names
from spa_ray.judging.judge_models import judge_rows, load_model_judge

__all__ = ["ModelJudgeActor", "label_rows_by_model"]


class ModelJudgeActor(WeightedActor):
    """Labels rows with text fields (prompt, response_1, response_2) by a trained judge folder."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        version: int = 0,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 64,
        num_threads: int | None = None,
        label: str | None = None,
    ):
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.judge = load_model_judge(model_path, device=device, dtype=dtype, batch_size=batch_size)
        self._names = checkpoint_tensor_names(model_path)
        self._init_weights_state(label, model_path, version)

    def label(self, rows: list[dict]) -> list[dict]:
        """Per row: reward_1/2, probability = sigma(r1 - r2) (given order), first_is_chosen, is_tie."""
        return judge_rows(self.judge, rows, version=self._version)

    def describe(self) -> dict:
        return dict(self.judge.info)

    def _load_verified(self, state_dict: Mapping[str, torch.Tensor], version: int, checksum: str) -> str:
        got = copy_and_verify(self.judge.model, state_dict, checksum, self.actor_label)
        self._names = sorted(state_dict)
        return got

    def _live_checksum(self) -> str:
        return model_checksum(self.judge.model, self._names)


def label_rows_by_model(pool, rows: list[dict]) -> list[dict]:
    """Label over a ShardedActors pool of ModelJudgeActors; one label per row, in row order."""
    out = pool.map_shards("label", list(rows))
    if len(out) != len(rows):
        raise RuntimeError(f"judging over {pool.name} returned {len(out)} labels for {len(rows)} rows")
    return out
