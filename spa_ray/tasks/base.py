"""The `Task` interface: what SPA needs from a problem domain, and `load_task`.

A task supplies
- prompts, split into disjoint sets: the seed set X0 (whose pairs carry gold labels),
  one set per SPA iteration X1..XT (prompts only), and a held-out evaluation set;
- seed preference pairs with gold labels (like UltraFeedback's off-policy pairs);
- a gold judge ``score(prompt, response) -> float``. It labels the seed pairs and scores
  evaluation samples; the training loop never calls it (SPA labels its own pairs);
- SFT demonstrations, and optionally a pretraining corpus (only a task that builds its
  own model from scratch, like the embedded one, needs them).

Prompts and responses are plain strings. Chat formatting is the tokenizer's chat
template (``apply_chat_template([{"role": "user", "content": prompt}],
add_generation_prompt=True)``), so the same code path serves a real HF model.

A user plugs a task in by import path: ``task: my_pkg.my_module:MyTask`` in the config,
resolved by :func:`load_task`.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One pair type for the whole project: a task's gold pair is the data layer's record
# (prompt, chosen, rejected, chosen_score, rejected_score, then provenance).
from spa_ray.data.records import PreferencePair

__all__ = [
    "PromptSplits",
    "PreferencePair",
    "Demonstration",
    "Task",
    "TaskLoadError",
    "load_task",
    "check_disjoint",
]


@dataclass(frozen=True)
class PromptSplits:
    """Disjoint prompt sets of one data seed.

    ``seed``: X0, the prompts of the gold-labelled seed pairs D0.
    ``iterations``: X1..XT, prompts only (SPA generates and self-labels their pairs).
    ``evaluation``: held out; never trained on.
    """

    seed: list[str]
    iterations: list[list[str]]
    evaluation: list[str]
    data_seed: int = 0

    def all_sets(self) -> dict[str, list[str]]:
        out = {"seed": self.seed}
        out.update({f"iteration_{t + 1}": xs for t, xs in enumerate(self.iterations)})
        out["evaluation"] = self.evaluation
        return out

    def __post_init__(self) -> None:
        check_disjoint(self.all_sets())


@dataclass(frozen=True)
class Demonstration:
    """One SFT example: the response to imitate for ``prompt``."""

    prompt: str
    response: str
    meta: dict = field(default_factory=dict, compare=False)


def check_disjoint(sets: dict[str, Sequence[str]]) -> None:
    """ValueError naming the two sets and an example prompt if any prompt appears twice."""
    seen: dict[str, str] = {}
    for name, prompts in sets.items():
        for p in prompts:
            if p in seen:
                where = "twice in" if seen[p] == name else f"in both {seen[p]!r} and"
                raise ValueError(f"prompt sets must be disjoint: {p!r} is {where} {name!r}")
            seen[p] = name


class Task(abc.ABC):
    """A problem domain for SPA. Subclass it and implement the abstract methods.

    Everything must be deterministic given the ``seed`` arguments, so a run and its
    resume see the same prompts and pairs.
    """

    #: short identifier used in run names, cache keys and reports
    name: str = "task"

    @abc.abstractmethod
    def prompt_splits(
        self,
        seed: int = 0,
        n_seed: int | None = None,
        n_iterations: Sequence[int] | None = None,
        n_evaluation: int | None = None,
    ) -> PromptSplits:
        """Disjoint seed / iteration / evaluation prompt sets drawn with ``seed``.

        ``None`` sizes take the task's defaults.
        """

    @abc.abstractmethod
    def seed_pairs(self, prompts: Sequence[str], seed: int = 0) -> list[PreferencePair]:
        """Gold-labelled pairs for ``prompts`` (at most one per prompt; ties dropped)."""

    @abc.abstractmethod
    def score(self, prompt: str, response: str) -> float:
        """The gold judge: higher is better. For seed labels, evaluation and the label audit only."""

    #: whether ``score`` is a gold judge (a dataset of labelled pairs alone has none)
    has_gold_judge: bool = True

    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    @abc.abstractmethod
    def sft_demonstrations(self, n: int | None = None, seed: int = 0) -> list[Demonstration]:
        """Demonstrations in the answer format for supervised fine-tuning."""

    def pretraining_corpus(self, n: int | None = None, seed: int = 0) -> Iterator[str]:
        """Plain-text documents for pretraining a model from scratch (optional)."""
        raise NotImplementedError(
            f"task {self.name!r} has no pretraining corpus; give a pretrained/SFT model (model path) instead"
        )

    def default_model(self) -> str | None:
        """A model (hub id or local path) to use when the config names none; None: the config must name one."""
        return None

    def use_policy(self, model: str | Path) -> None:
        """The run's pi_init, told by the pipeline before any data is made; a task whose gold
        pairs are the model's own samples (on-policy) samples from it. Default: ignored."""

    def data_report(self) -> dict[str, int]:
        """Counts of what loading the task's data skipped or changed (duplicate prompts
        dropped, rows skipped), recorded by the prepare stage; {} when nothing was."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Small JSON-able summary for run metadata."""
        return {"name": self.name, "class": f"{type(self).__module__}:{type(self).__qualname__}"}


class TaskLoadError(ImportError):
    """A task import path could not be resolved to a Task subclass; the message names the path."""


def load_task(path: str, **kwargs: Any) -> Task:
    """Instantiate the Task at ``"pkg.module:ClassName"`` with ``kwargs``.

    ``"pkg.module:Class.attr"`` may name a nested attribute. The attribute may be a Task
    subclass (called with ``kwargs``), a factory returning a Task, or a Task instance
    (then ``kwargs`` must be empty).
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise TaskLoadError(f"task path must look like 'pkg.module:ClassName', got {path!r}")
    module_name, attr_path = path.split(":")
    if not module_name or not attr_path:
        raise TaskLoadError(f"task path must look like 'pkg.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise TaskLoadError(f"task {path!r}: cannot import module {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TaskLoadError(f"task {path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Task):
        if kwargs:
            raise TaskLoadError(f"task {path!r} is an instance; it takes no keyword arguments, got {sorted(kwargs)}")
        return obj
    if inspect.isclass(obj) and not issubclass(obj, Task):
        raise TaskLoadError(f"task {path!r}: {obj.__qualname__} is not a subclass of spa_ray.tasks.base.Task")
    if inspect.isclass(obj) and inspect.isabstract(obj):
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        raise TaskLoadError(f"task {path!r}: {obj.__qualname__} is abstract (does not implement {missing})")
    if not callable(obj):
        raise TaskLoadError(f"task {path!r}: {type(obj).__name__} object is not a Task class or factory")
    try:
        task = obj(**kwargs)
    except TypeError as exc:
        raise TaskLoadError(f"task {path!r}: cannot construct with {kwargs!r}: {exc}") from exc
    if not isinstance(task, Task):
        raise TaskLoadError(f"task {path!r}: the factory returned {type(task).__name__}, not a Task")
    return task
