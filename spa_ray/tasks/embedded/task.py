"""`EmbeddedTask`: the bundled task (``spa_ray.tasks.embedded:EmbeddedTask``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..base import Demonstration, PreferencePair, PromptSplits, Task
from .onpolicy import REJECTED_RULES, onpolicy_pairs
from .world import DEFAULT_FAMILIES, DemoQuality, World, _rng

__all__ = ["EmbeddedTask", "first_differing_pair"]


def first_differing_pair(prompt: str, respond: Callable[[], str], score: Callable[[str, str], float],
                         max_tries: int = 20) -> PreferencePair | None:
    """One response, then up to ``max_tries`` more until one differs from it in gold score:
    the two ordered chosen/rejected, or None if every retry tied."""
    a = respond()
    sa = score(prompt, a)
    for _ in range(max_tries):
        b = respond()
        sb = score(prompt, b)
        if sb != sa:
            return PreferencePair(prompt, a, b, sa, sb) if sa > sb else PreferencePair(prompt, b, a, sb, sa)
    return None


class EmbeddedTask(Task):
    """A made-up knowledge-base world with a gold judge of five independent qualities.

    Sizes follow the paper's proportions: the prompt space (38,784 distinct prompts) plays
    UltraFeedback's 60K; the seed set is ``seed_fraction`` (3.3%) of it, 1,280 gold pairs.
    Iteration sets default to sizes that keep the embedded default run near 15 minutes
    on 2 CPU cores.
    """

    name = "embedded"
    #: where the evaluation set starts in each data seed's permutation (the default seed size)
    LAYOUT_SEED_FRACTION = 0.033
    PAIR_SOURCES = ("demos", "sft")
    #: on-policy pairs sample with seed + this, apart from every other sampling seed
    ONPOLICY_SEED_OFFSET = 60_000

    def __init__(
        self,
        world_seed: int = 0,
        per_category: int = 24,
        seed_fraction: float = 0.033,
        n_iterations: Sequence[int] = (1000, 2000),
        n_evaluation: int = 500,
        n_sft: int = 24000,
        quality: dict[str, float] | None = None,
        families: Sequence[str] | None = None,
        pair_source: str = "demos",
        pair_samples: int = 4,
        pair_model: str | None = None,
        pair_rejected: str = "random",
    ) -> None:
        """``pair_source``: where gold pairs come from. ``"demos"``: two demonstration-
        distribution responses (off-policy, like UltraFeedback's). ``"sft"``: ``pair_samples``
        samples of the SFT model per prompt, best against a worse one (on-policy, like
        SimPO's on-policy UltraFeedback; see ``onpolicy``); the model is ``pair_model`` (a
        path or hub id), else the run's pi_init (the pipeline passes it through
        ``use_policy``), else this task's own tiny model. ``pair_rejected``: which worse
        sample is rejected, ``"random"`` or ``"worst"`` (``onpolicy.best_against_worse``)."""
        if not 0 < seed_fraction < 1:
            raise ValueError(f"seed_fraction must be in (0, 1), got {seed_fraction}")
        if pair_source not in self.PAIR_SOURCES:
            raise ValueError(f"pair_source must be one of {', '.join(self.PAIR_SOURCES)}, got {pair_source!r}")
        if int(pair_samples) < 2:
            raise ValueError(f"pair_samples must be at least 2, got {pair_samples}")
        if pair_rejected not in REJECTED_RULES:
            raise ValueError(f"pair_rejected must be one of {', '.join(REJECTED_RULES)}, got {pair_rejected!r}")
        self.pair_rejected = pair_rejected
        self.pair_source = pair_source
        self.pair_samples = int(pair_samples)
        self.pair_model = pair_model
        self.world = World(world_seed, per_category, DemoQuality(**(quality or {})),
                           tuple(families) if families else DEFAULT_FAMILIES)
        self.world_seed = world_seed
        self.seed_fraction = seed_fraction
        self.default_iterations = [int(n) for n in n_iterations]
        self.default_evaluation = int(n_evaluation)
        self.n_sft = int(n_sft)

    # ----------------------------------------------------------------- Task API
    def all_prompts(self) -> list[str]:
        return self.world.all_prompts()

    def prompt_splits(
        self,
        seed: int = 0,
        n_seed: int | None = None,
        n_iterations: Sequence[int] | None = None,
        n_evaluation: int | None = None,
    ) -> PromptSplits:
        prompts = self.world.all_prompts()
        total = len(prompts)
        n_seed = round(self.seed_fraction * total) if n_seed is None else int(n_seed)
        n_its = self.default_iterations if n_iterations is None else [int(n) for n in n_iterations]
        n_eval = self.default_evaluation if n_evaluation is None else int(n_evaluation)
        need = n_seed + n_eval + sum(n_its)
        if min([n_seed, n_eval, *n_its]) < 0 or need > total:
            raise ValueError(f"split sizes seed={n_seed} iterations={n_its} evaluation={n_eval} need {need} "
                             f"prompts; the world has {total}")
        order = self._permutation(seed)
        # The evaluation and iteration sets sit at fixed places of the permutation (after a
        # seed region of the default 3.3%), so a seed-size ablation changes only the seed
        # set, as in the paper's Table 3. A larger seed set takes its extra prompts from the
        # end of the permutation; a smaller one is a prefix of the default seed set.
        anchor = round(self.LAYOUT_SEED_FRACTION * total)
        evaluation = order[anchor : anchor + n_eval]
        pos = anchor + n_eval
        its = []
        for n in n_its:
            its.append(order[pos : pos + n])
            pos += n
        extra = max(0, n_seed - anchor)
        if pos + extra > total:
            raise ValueError(f"split sizes seed={n_seed} iterations={n_its} evaluation={n_eval} need "
                             f"{pos + extra} prompts with the fixed layout; the world has {total}")
        seed_set = order[: min(n_seed, anchor)] + (order[total - extra :] if extra else [])
        return PromptSplits(seed=seed_set, iterations=its, evaluation=evaluation, data_seed=seed)

    def training_prompts(self, seed: int = 0, n_evaluation: int | None = None) -> list[str]:
        """Every prompt except the evaluation set of ``seed``: the "100%" gold-label budget."""
        n_eval = self.default_evaluation if n_evaluation is None else int(n_evaluation)
        order = self._permutation(seed)
        anchor = round(self.LAYOUT_SEED_FRACTION * len(order))
        return order[:anchor] + order[anchor + n_eval :]

    def _permutation(self, seed: int) -> list[str]:
        order = self.world.all_prompts()
        _rng("splits", self.world_seed, seed).shuffle(order)
        return order

    def seed_pairs(self, prompts: Sequence[str], seed: int = 0) -> list[PreferencePair]:
        if self.pair_source == "sft":
            model = self.pair_model or self.default_model()
            return onpolicy_pairs(str(model), prompts, self.score, self.pair_samples,
                                  seed + self.ONPOLICY_SEED_OFFSET, self.pair_rejected)
        pairs = []
        for p in prompts:
            pair = self.sample_pair(p, _rng("pair", self.world_seed, seed, p))
            if pair is not None:
                pairs.append(pair)
        return pairs

    def sample_pair(self, prompt: str, rng, max_tries: int = 20) -> PreferencePair | None:
        """Two demonstration-distribution responses with different gold scores, ordered.

        Both answer from one draw of valid items (one draft) and differ only in their
        independent corruptions, so what separates them is quality, not which valid items
        happen to be named. Measured (docs/world.md, world v4): pi_0's labels of its own
        samples agree with gold 0.666 on average over 3 seeds with these pairs, 0.649 with
        two independent demonstrations.
        """
        draft = random.Random(rng.getrandbits(64))
        state = draft.getstate()

        def respond() -> str:
            draft.setstate(state)
            return self.world.sample_response(prompt, rng, items_rng=draft)[0]

        return first_differing_pair(prompt, respond, self.score, max_tries)

    def score(self, prompt: str, response: str) -> float:
        return self.world.gold_score(prompt, response)

    def quality_scores(self, prompt: str, response: str) -> dict[str, float]:
        return self.world.quality_scores(prompt, response)

    def sft_demonstrations(self, n: int | None = None, seed: int = 0) -> list[Demonstration]:
        n = self.n_sft if n is None else int(n)
        rng = _rng("sft", self.world_seed, seed)
        prompts = self.world.all_prompts()
        out = []
        for _ in range(n):
            p = rng.choice(prompts)
            r, flags = self.world.sample_response(p, rng)
            out.append(Demonstration(p, r, {"corrupted": [k for k, v in flags.items() if v]}))
        return out

    def pretraining_corpus(self, n: int | None = None, seed: int = 0) -> Iterator[str]:
        return self.world.corpus_documents(120_000 if n is None else int(n), seed)

    def use_policy(self, model: str | Path) -> None:
        """The run's pi_init (called by the pipeline): on-policy pairs are its samples unless
        ``pair_model`` named a model explicitly."""
        if self.pair_model is None:
            self.pair_model = str(model)

    def default_model(self, cache_dir: str | Path | None = None, **kwargs: Any) -> str:
        """Folder of the task's tiny SFT model (pi_init), built and cached on first use."""
        from .build import build_embedded_model

        return str(build_embedded_model(cache_dir=cache_dir, task=self, **kwargs))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(world_seed=self.world_seed, n_prompts=len(self.world.specs), seed_fraction=self.seed_fraction,
                 quality=self.world.quality.as_dict(), families=list(self.world.families),
                 pair_source=self.pair_source, pair_samples=self.pair_samples,
                 pair_rejected=self.pair_rejected)
        return d
