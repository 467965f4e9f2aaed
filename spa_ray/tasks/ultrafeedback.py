"""UltraFeedback as a `Task`: the paper's setting (``spa_ray.tasks.ultrafeedback:UltraFeedbackTask``).

The gold pairs come from an `argilla/ultrafeedback-binarized-preferences-cleaned`-style
dataset (hub id or local JSONL/parquet); the split is the paper's (seed 2K = 3.3%, then
8K / 20K / 30K prompts, see ``spa_ray.data.splits``). There is no gold judge to call:
evaluation writes AlpacaEval JSON for ``alpaca_eval`` (GPT-4 as judge), which runs outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spa_ray.data.splits import SplitConfig, split_pairs
from spa_ray.data.ultrafeedback import load_ultrafeedback
from spa_ray.tasks.base import Demonstration, PreferencePair, PromptSplits, Task


class UltraFeedbackTask(Task):
    name = "ultrafeedback"

    def __init__(
        self,
        dataset: str = "argilla/ultrafeedback-binarized-preferences-cleaned",
        seed_fraction: float = 2 / 60,
        iteration_fractions: Sequence[float] = (8 / 60, 20 / 60, 30 / 60),
        holdout_fraction: float = 0.015,
        split: str = "train",
        limit: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.split_config = dict(
            seed_fraction=float(seed_fraction),
            iteration_fractions=tuple(float(f) for f in iteration_fractions),
            holdout_fraction=float(holdout_fraction),
        )
        SplitConfig(**self.split_config)  # validate early, naming the bad fraction
        self.split = split
        self.limit = limit
        self._pairs: Any = None
        self._gold: dict[str, Any] = {}

    def _loaded(self):
        if self._pairs is None:
            loaded = load_ultrafeedback(self.dataset, split=self.split, limit=self.limit)
            self._pairs, self._load_stats = loaded.pairs, loaded.stats
            self._gold = {p.key: p for p in self._pairs}
        return self._pairs

    def prompt_splits(self, seed: int = 0, n_seed=None, n_iterations=None, n_evaluation=None) -> PromptSplits:
        if n_seed is not None or n_iterations is not None or n_evaluation is not None:
            raise ValueError("UltraFeedbackTask sizes are fractions: set seed_fraction / iteration_fractions")
        splits = split_pairs(self._loaded(), SplitConfig(**self.split_config, shuffle_seed=seed))
        return PromptSplits(
            seed=[p.prompt for p in splits.seed],
            iterations=[[r.prompt for r in xs] for xs in splits.iterations],
            evaluation=[p.prompt for p in splits.holdout],
            data_seed=seed,
        )

    def data_report(self) -> dict[str, int]:
        self._loaded()
        stats = self._load_stats.summary()
        return {"rows_read": stats["rows_read"], "duplicate_prompts_dropped": stats["duplicates_dropped"],
                "overlong_rows_skipped": stats["overlong_skipped"], "overlong_rows_kept": stats["overlong_kept"]}

    def seed_pairs(self, prompts: Sequence[str], seed: int = 0) -> list[PreferencePair]:
        """The dataset's own gold pairs of ``prompts`` (with their file/row provenance)."""
        self._loaded()
        return [self._gold[prompt.strip()] for prompt in prompts]

    has_gold_judge = False

    def score(self, prompt: str, response: str) -> float:
        raise NotImplementedError(
            "UltraFeedback has no gold judge to call here: score the written alpaca_eval.json with alpaca_eval"
        )

    def sft_demonstrations(self, n=None, seed: int = 0) -> list[Demonstration]:
        raise NotImplementedError("give an SFT model as model.name_or_path (the paper starts from one)")
