"""The run directory: the single source of truth of a run, and why a killed run resumes.

Every stage writes into a temporary folder and is renamed into place only when it is
complete; the ledger ``stages.json`` is rewritten atomically (write, fsync, rename)
after the rename. A run killed at any instant therefore leaves either a finished stage
recorded in the ledger, or a temporary folder that the next start deletes and redoes.
Nothing is ever written outside the run's root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from spa_ray.atomic_files import TMP_PREFIX, atomic_write_text, fsync_dir

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunDirError(ValueError):
    """A run-directory path or ledger is unsafe or corrupt; the message names it."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise RunDirError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' only (no '/', no '..')")
    return name


class RunDirectory:
    """``<root>/<name>/`` with config.yaml, stages.json, data/, checkpoints/, metrics.jsonl."""

    LEDGER = "stages.json"

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root).resolve()
        self.path = self.root / _check_name(name, "run name")
        self.path.mkdir(parents=True, exist_ok=True)
        self._ledger = self._read_ledger()
        self._clean_temporaries()

    # -- paths -----------------------------------------------------------------
    def subpath(self, *parts: str) -> Path:
        """A path inside the run directory; any part that could escape it is refused."""
        for part in parts:
            for piece in part.split("/"):
                _check_name(piece, "path part")
        path = self.path.joinpath(*parts).resolve()
        if self.path not in path.parents and path != self.path:
            raise RunDirError(f"{path} is outside the run directory {self.path}")
        return path

    # -- ledger ----------------------------------------------------------------
    def _read_ledger(self) -> dict[str, Any]:
        ledger_path = self.path / self.LEDGER
        if not ledger_path.exists():
            return {"finished": {}}
        try:
            data = json.loads(ledger_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{ledger_path}: corrupt stage ledger ({exc}); move the run aside to restart") from None
        if not isinstance(data, dict) or not isinstance(data.get("finished"), dict):
            raise RunDirError(f"{ledger_path}: missing 'finished' mapping")
        return data

    def _write_ledger(self) -> None:
        atomic_write_text(self.path / self.LEDGER, json.dumps(self._ledger, indent=2, sort_keys=True))

    def is_done(self, stage: str) -> bool:
        return stage in self._ledger["finished"]

    def stage_info(self, stage: str) -> dict[str, Any]:
        return dict(self._ledger["finished"][stage])

    def finished_stages(self) -> list[str]:
        return sorted(self._ledger["finished"], key=lambda s: self._ledger["finished"][s]["finished_at"])

    def mark_done(self, stage: str, **info: Any) -> None:
        self._ledger["finished"][_check_name(stage, "stage")] = {"finished_at": time.time(), **info}
        self._write_ledger()

    # -- stages ------------------------------------------------------------------
    @contextlib.contextmanager
    def stage_dir(self, stage: str, *relative: str, **info: Any) -> Iterator[Path]:
        """Yield a temporary folder; on success rename it to ``relative`` and record the stage.

        If the body raises, the temporary folder is removed and the stage stays unfinished.
        """
        final = self.subpath(*relative)
        if self.is_done(stage):
            raise RunDirError(f"stage {stage!r} is already finished in {self.path}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # left by a run killed between rename and ledger write
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        self.mark_done(stage, path=str(final.relative_to(self.path)), **info)

    def adopt_stage(self, stage: str, source: Path, relative: str, **info: Any) -> None:
        """Record ``stage`` as finished with a copy of another run's output folder ``source``
        (``run.start_from``), through the same temporary-folder-then-rename as a stage."""
        with self.stage_dir(stage, *relative.split("/"), **info) as tmp:
            shutil.copytree(source, tmp, symlinks=True, dirs_exist_ok=True)

    def _clean_temporaries(self) -> None:
        """Remove what killed runs left half-written; finished stages are never touched."""
        for tmp in self.path.rglob(f"{TMP_PREFIX}*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        for stage, info in list(self._ledger["finished"].items()):
            rel = info.get("path")
            if rel and not (self.path / rel).exists():
                raise RunDirError(f"{self.path / rel}: stage {stage!r} is recorded finished but its output is missing")

    # -- small files ---------------------------------------------------------------
    def write_text(self, name: str, text: str) -> Path:
        path = self.subpath(name)
        atomic_write_text(path, text)
        return path

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line per event; flushed so a kill loses at most the line being written."""
        path = self.subpath("metrics.jsonl")
        line = json.dumps({"time": time.time(), **record}, sort_keys=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics_file(self.path / "metrics.jsonl")


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if absent), read only: a line cut by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return records
