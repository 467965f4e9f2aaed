"""Plain records of the data layer: preference pairs and prompts.

Both are frozen dataclasses of plain Python values (picklable, cheap to ship between Ray
actors, convertible to a parquet row with :meth:`to_dict`). ``file``/``row`` record where
a record came from (0-based row index in that file) so later errors can point back at it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["PreferencePair", "PromptRecord", "prompt_key", "prompt_id"]


def prompt_key(prompt: str) -> str:
    """The identity of a prompt for de-duplication and split disjointness: the text with
    surrounding whitespace stripped (inner whitespace and case are significant)."""
    return prompt.strip()


def prompt_id(prompt: str) -> str:
    """A short stable id of a prompt (first 16 hex digits of sha1 of :func:`prompt_key`)."""
    return hashlib.sha1(prompt_key(prompt).encode("utf-8")).hexdigest()[:16]


class _PromptRecordMixin:
    """What both records share: prompt identity and plain-dict round trips (unknown keys dropped)."""

    prompt: str

    @property
    def key(self) -> str:
        return prompt_key(self.prompt)

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class PreferencePair(_PromptRecordMixin):
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``source`` is the dataset's own ``source`` column (e.g. ``"evol_instruct"``) when present;
    ``*_score`` are the gold ratings (UltraFeedback ``chosen-rating``/``rejected-rating``).
    """

    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    file: str | None = None
    row: int | None = None
    source: str | None = None
    chosen_model: str | None = None
    rejected_model: str | None = None

    def to_prompt(self) -> "PromptRecord":
        """The prompt alone (gold responses and labels dropped), keeping provenance."""
        return PromptRecord(prompt=self.prompt, file=self.file, row=self.row, source=self.source)


@dataclass(frozen=True)
class PromptRecord(_PromptRecordMixin):
    """A prompt without responses (the iteration prompt sets X_1, X_2, ...)."""

    prompt: str
    file: str | None = None
    row: int | None = None
    source: str | None = None
