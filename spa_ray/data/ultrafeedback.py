"""Loading UltraFeedback-style preference data (the paper's
``argilla/ultrafeedback-binarized-preferences-cleaned``) with row-level validation.

Accepted rows: a ``prompt`` string and ``chosen``/``rejected`` that are either response
strings or message lists ``[{"role": ..., "content": ...}, ...]``. A message list must be
``[assistant]``, ``[user, assistant]`` or ``[system, user, assistant]``; its last
(assistant) message is the response and its user turn, when present, must equal the
``prompt`` column (compared after stripping surrounding whitespace). Optional columns:
``source``, ``chosen-rating``/``rejected-rating`` (or ``score_chosen``/``score_rejected``,
the HuggingFaceH4 names), ``chosen-model``/``rejected-model``; other columns are ignored.

Sources: a local ``.jsonl``/``.json``/``.parquet`` file, a directory (every such file
below it, sorted by path, each loaded on its own so rows keep their in-file index), or a
hub id (``owner/name``, passed to ``datasets.load_dataset`` untouched; needs network or a
cached copy). Local files go through ``datasets.load_dataset("json"|"parquet",
data_files=...)``; JSON files are first checked to be UTF-8.

Every problem raises :class:`DataError` naming the file, the 0-based row in that file
(for JSONL: the index among non-blank lines, which is what ``datasets`` counts) and the
field. Policies, each counted in :class:`LoadStats`:

* duplicated prompts (same :func:`~spa_ray.data.records.prompt_key`): ``duplicates=
  "keep_first"`` (default) keeps the first row in load order and drops later ones;
  ``"error"`` raises. Every row is still validated, duplicates included.
* over-long rows (only checked when a ``tokenizer`` and ``max_total_len`` are given;
  lengths as produced by :func:`~spa_ray.data.tokenize.tokenize_pair`, before any
  truncation): prompt > ``max_prompt_len`` or prompt + chosen/rejected (+EOS) >
  ``max_total_len``. ``on_overlong="error"`` (default) raises, ``"skip"`` drops the row,
  ``"keep"`` keeps it (tokenize_pair will truncate it later). The length check runs after
  de-duplication.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .records import PreferencePair, PromptRecord, prompt_key

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LoadStats",
    "LoadedPairs",
    "LoadedPrompts",
    "resolve_files",
    "iter_source_tables",
    "response_text",
    "parse_preference_row",
    "pairs_from_rows",
    "load_ultrafeedback",
    "load_prompts",
]

SUPPORTED_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_LAYOUTS = (["assistant"], ["user", "assistant"], ["system", "user", "assistant"])
_SCORE_KEYS = {"chosen": ("chosen-rating", "score_chosen", "chosen_score"),
               "rejected": ("rejected-rating", "score_rejected", "rejected_score")}
_MODEL_KEYS = {"chosen": ("chosen-model", "chosen_model"), "rejected": ("rejected-model", "rejected_model")}


@dataclass
class LoadStats:
    """What a load did. ``duplicate_rows``/``overlong_rows`` list ``(file, row)`` /
    ``(file, row, field)`` of every dropped (or, for ``on_overlong="keep"``, kept) row."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    kept: int = 0
    duplicates_dropped: int = 0
    overlong_skipped: int = 0
    overlong_kept: int = 0
    duplicate_rows: list[tuple[str, int]] = field(default_factory=list)
    overlong_rows: list[tuple[str, int, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "files": len(self.files),
            "rows_read": self.rows_read,
            "kept": self.kept,
            "duplicates_dropped": self.duplicates_dropped,
            "overlong_skipped": self.overlong_skipped,
            "overlong_kept": self.overlong_kept,
        }


@dataclass
class LoadedPairs(Sequence):
    """The pairs of a load, in load order, with their :class:`LoadStats`."""

    pairs: list[PreferencePair]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)


@dataclass
class LoadedPrompts(Sequence):
    prompts: list[PromptRecord]
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.prompts)


# ----------------------------------------------------------------------------- sources


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~"))
        or os.sep in s and s.count("/") != 1
        or any(s.endswith(suf) for suf in SUPPORTED_SUFFIXES)
    )


def resolve_files(source: str | os.PathLike) -> list[Path] | None:
    """Local files behind ``source`` (a file or a directory), or None for a hub id.
    Raises DataError for a missing path or a directory without data files."""
    s = os.fspath(source)
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"unsupported file type {p.suffix!r}; expected one of {sorted(SUPPORTED_SUFFIXES)}", file=s)
        return [p]
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"directory has no {'/'.join(sorted(SUPPORTED_SUFFIXES))} files", file=s)
        return files
    if isinstance(source, os.PathLike) or _looks_like_path(s):
        raise DataError("no such file or directory", file=s)
    return None


def _check_json_file(path: Path) -> None:
    """UTF-8 check (and non-emptiness) of a JSON/JSONL file, before datasets reads it."""
    jsonl = path.suffix.lower() == ".jsonl"
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError("file is UTF-16 encoded (byte-order mark); it must be UTF-8", file=str(path))
        f.seek(0)
        row = 0
        offset = 0
        for lineno, line in enumerate(f):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not valid UTF-8: byte 0x{line[e.start]:02x} on line {lineno + 1} (byte offset "
                    f"{offset + e.start}); the file must be UTF-8 encoded",
                    file=str(path),
                    row=row if jsonl else None,
                ) from None
            if line.strip():
                row += 1
            offset += len(line)
    if row == 0:
        raise DataError("file has no rows", file=str(path))


def _diagnose_json(path: Path, err: Exception) -> DataError:
    import json

    if path.suffix.lower() == ".jsonl":
        row = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return DataError(f"invalid JSON: {e}", file=str(path), row=row)
                if not isinstance(obj, dict):
                    return DataError(f"a row must be a JSON object, got {type(obj).__name__}", file=str(path), row=row)
                row += 1
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return DataError(f"could not be read as JSON: {type(cause).__name__}: {cause}", file=str(path))


def iter_source_tables(
    source: str | os.PathLike,
    *,
    split: str = "train",
    cache_dir: str | None = None,
    revision: str | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(file_label, datasets.Dataset)`` per file of ``source`` (one for a hub id,
    labelled ``"<id>[<split>]"``). ``split``/``revision`` apply to hub ids only."""
    import datasets

    files = resolve_files(source)
    if files is None:
        hub_id = os.fspath(source)
        try:
            ds = datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir, revision=revision)
        except Exception as e:  # no network, unknown id, bad split: say which source
            raise DataError(
                f"could not load hub dataset (needs network or a local cache): {type(e).__name__}: {e}",
                file=f"{hub_id}[{split}]",
            ) from e
        yield f"{hub_id}[{split}]", ds
        return
    for path in files:
        builder = SUPPORTED_SUFFIXES[path.suffix.lower()]
        if builder == "json":
            _check_json_file(path)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as e:
            if builder == "json":
                raise _diagnose_json(path, e) from e
            raise DataError(f"could not be read as parquet: {type(e).__name__}: {e}", file=str(path)) from e
        if len(ds) == 0:
            raise DataError("file has no rows", file=str(path))
        yield str(path), ds


# ----------------------------------------------------------------------------- rows


def _prompt_text(value: Any, *, file: str | None, row: int | None, column: str = "prompt") -> str:
    if value is None:
        raise DataError("missing or null", file=file, row=row, field=column)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", file=file, row=row, field=column)
    if not value.strip():
        raise DataError("empty prompt", file=file, row=row, field=column)
    return value


def response_text(value: Any, *, prompt: str, file: str | None = None, row: int | None = None, field: str = "chosen") -> str:
    """The response in a ``chosen``/``rejected`` cell (a string or a message list), checked
    as described in the module docstring."""
    if value is None:
        raise DataError("missing or null", file=file, row=row, field=field)
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        if not value:
            raise DataError("empty message list", file=file, row=row, field=field)
        for j, m in enumerate(value):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise DataError(f"message {j} is not a {{'role', 'content'}} mapping: {m!r:.80}", file=file, row=row, field=field)
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"message {j} has unknown role {m['role']!r}", file=file, row=row, field=field)
            if not isinstance(m["content"], str):
                raise DataError(
                    f"message {j} ({m['role']}) content is {type(m['content']).__name__}, not a string",
                    file=file, row=row, field=field,
                )
        roles = [m["role"] for m in value]
        if roles not in _LAYOUTS:
            raise DataError(
                f"wrong role layout {roles}: expected [user, assistant] (optionally preceded by system) "
                "or [assistant], the last message being the response",
                file=file, row=row, field=field,
            )
        if "user" in roles:
            user = value[roles.index("user")]["content"]
            if prompt_key(user) != prompt_key(prompt):
                raise DataError(
                    f"user turn {user!r:.60} differs from the 'prompt' column {prompt!r:.60}",
                    file=file, row=row, field=field,
                )
        text = value[-1]["content"]
    else:
        raise DataError(
            f"expected a string or a list of messages, got {type(value).__name__}", file=file, row=row, field=field
        )
    if not text.strip():
        raise DataError("empty response", file=file, row=row, field=field)
    return text


def _score(row: Mapping[str, Any], keys: Sequence[str], *, file, idx) -> float | None:
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            raise DataError(f"expected a number, got {v!r:.40}", file=file, row=idx, field=k)
        return float(v)
    return None


def _opt_str(row: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for k in keys:
        v = row.get(k)
        if isinstance(v, str):
            return v
    return None


def parse_preference_row(row: Mapping[str, Any], *, file: str | None = None, index: int | None = None) -> PreferencePair:
    """Validate one row and turn it into a :class:`PreferencePair`."""
    for col in PAIR_COLUMNS:
        if col not in row:
            raise DataError("missing column", file=file, row=index, field=col)
    prompt = _prompt_text(row["prompt"], file=file, row=index)
    chosen = response_text(row["chosen"], prompt=prompt, file=file, row=index, field="chosen")
    rejected = response_text(row["rejected"], prompt=prompt, file=file, row=index, field="rejected")
    return PreferencePair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        file=file,
        row=index,
        source=_opt_str(row, ("source",)),
        chosen_score=_score(row, _SCORE_KEYS["chosen"], file=file, idx=index),
        rejected_score=_score(row, _SCORE_KEYS["rejected"], file=file, idx=index),
        chosen_model=_opt_str(row, _MODEL_KEYS["chosen"]),
        rejected_model=_opt_str(row, _MODEL_KEYS["rejected"]),
    )


class _LengthChecker:
    def __init__(self, tokenizer, max_prompt_len, max_total_len, on_overlong, system):
        if on_overlong not in ("error", "skip", "keep"):
            raise ValueError(f"on_overlong must be 'error', 'skip' or 'keep', got {on_overlong!r}")
        self.active = tokenizer is not None and max_total_len is not None
        if (max_total_len is not None or max_prompt_len is not None) and tokenizer is None:
            raise ValueError("length limits need a tokenizer")
        if max_prompt_len is not None and max_total_len is not None and max_prompt_len >= max_total_len:
            raise ValueError("max_prompt_len must be smaller than max_total_len")
        self.tokenizer, self.max_prompt_len, self.max_total_len = tokenizer, max_prompt_len, max_total_len
        self.on_overlong, self.system = on_overlong, system
        self.add_bos = None
        if self.active:
            from .tokenize import _adds_bos

            self.add_bos = _adds_bos(tokenizer)

    def violation(self, pair: PreferencePair) -> tuple[str, str] | None:
        """(field, reason) of the first limit the pair breaks, or None."""
        from .tokenize import encode_prompt, encode_response

        n_p = len(encode_prompt(self.tokenizer, pair.prompt, system=self.system, add_bos=self.add_bos))
        if self.max_prompt_len is not None and n_p > self.max_prompt_len:
            return "prompt", f"prompt has {n_p} tokens, more than max_prompt_len={self.max_prompt_len}"
        for side in ("chosen", "rejected"):
            n = n_p + len(encode_response(self.tokenizer, getattr(pair, side)))
            if n > self.max_total_len:
                return side, f"prompt+{side} have {n} tokens, more than max_total_len={self.max_total_len}"
        return None


def _collect(
    tables: Iterable[tuple[str, Any]],
    parse,
    required: Sequence[str],
    duplicates: str,
    checker: _LengthChecker | None,
    limit: int | None,
):
    if duplicates not in ("keep_first", "error"):
        raise ValueError(f"duplicates must be 'keep_first' or 'error', got {duplicates!r}")
    stats = LoadStats()
    out: list = []
    seen: dict[str, tuple[str, int]] = {}
    for file, ds in tables:
        stats.files.append(file)
        cols = set(getattr(ds, "column_names", ()))
        for col in required:
            if col not in cols:
                raise DataError(f"missing column (columns present: {sorted(cols)})", file=file, row=0, field=col)
        for idx, row in enumerate(ds):
            if limit is not None and len(out) >= limit:
                break
            stats.rows_read += 1
            rec = parse(row, file=file, index=idx)
            key = rec.key
            if key in seen:
                f0, r0 = seen[key]
                if duplicates == "error":
                    raise DataError(f"duplicated prompt {rec.prompt!r:.80}, first seen in {f0} row {r0}", file=file, row=idx, field="prompt")
                stats.duplicates_dropped += 1
                stats.duplicate_rows.append((file, idx))
                continue
            seen[key] = (file, idx)
            if checker is not None and checker.active:
                bad = checker.violation(rec)
                if bad is not None:
                    fld, reason = bad
                    if checker.on_overlong == "error":
                        raise DataError(reason + " (on_overlong='skip' drops such rows)", file=file, row=idx, field=fld)
                    stats.overlong_rows.append((file, idx, fld))
                    if checker.on_overlong == "skip":
                        stats.overlong_skipped += 1
                        continue
                    stats.overlong_kept += 1
            out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    stats.kept = len(out)
    return out, stats


def pairs_from_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    file: str = "<memory>",
    duplicates: str = "keep_first",
) -> LoadedPairs:
    """Validate in-memory rows (dicts in the file format) as if they were one file."""
    pairs, stats = _collect([(file, list(rows))], parse_preference_row, (), duplicates, None, None)
    return LoadedPairs(pairs, stats)


def load_ultrafeedback(
    source: str | os.PathLike = "argilla/ultrafeedback-binarized-preferences-cleaned",
    *,
    split: str = "train",
    tokenizer: Any = None,
    max_prompt_len: int | None = None,
    max_total_len: int | None = None,
    on_overlong: str = "error",
    duplicates: str = "keep_first",
    system: str | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> LoadedPairs:
    """Load and validate preference pairs from a hub id, a file or a directory.

    Policies (duplicates, over-long rows) are described in the module docstring; ``limit``
    stops after that many kept pairs.
    """
    checker = _LengthChecker(tokenizer, max_prompt_len, max_total_len, on_overlong, system)
    tables = iter_source_tables(source, split=split, cache_dir=cache_dir, revision=revision)
    pairs, stats = _collect(tables, parse_preference_row, PAIR_COLUMNS, duplicates, checker, limit)
    return LoadedPairs(pairs, stats)


def _parse_prompt_row(row: Mapping[str, Any], *, file: str | None, index: int | None, column: str = "prompt") -> PromptRecord:
    if column not in row:
        raise DataError("missing column", file=file, row=index, field=column)
    text = _prompt_text(row[column], file=file, row=index, column=column)
    return PromptRecord(prompt=text, file=file, row=index, source=_opt_str(row, ("source",)))


def load_prompts(
    source: str | os.PathLike,
    *,
    column: str = "prompt",
    split: str = "train",
    duplicates: str = "keep_first",
    limit: int | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> LoadedPrompts:
    """Load prompts only (any file with a ``column`` of non-empty strings: a prompt list or a
    preference file whose responses are ignored). Same duplicate policy as pairs."""

    def parse(row, *, file, index):
        return _parse_prompt_row(row, file=file, index=index, column=column)

    tables = iter_source_tables(source, split=split, cache_dir=cache_dir, revision=revision)
    prompts, stats = _collect(tables, parse, (column,), duplicates, None, limit)
    return LoadedPrompts(prompts, stats)
