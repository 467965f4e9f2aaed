"""The on-policy label audit: the stop rule of self-labelling (issue #21).

The judge health check scores the judge on held-out *seed* pairs (off-policy): it read
0.77-0.80 while a loop at lr 1e-4 collapsed (win rate 0.06), because the judge is fine on
seed-like responses and wrong on its own degenerate ones. The audit instead takes
``audit.pairs`` random pairs of the very pairs an iteration would train on, asks an
external auditor which response is better, and stops the run before pi_t is trained when
the self-labels agree with it, at 95% confidence, on less than ``audit.floor`` (the
audited pairs are never trained on, so the figure is not biased by training on them).

Auditors (``audit.auditor``), each a function (prompts, chosen, rejected) -> per pair
True (agrees with the self-label), False (prefers the rejected response) or None (cannot
tell, e.g. a gold tie; not counted):
- ``gold``: the task's gold judge (the embedded task has one);
- ``module:function``: any importable function with that signature;
- ``file``: the run writes ``request.jsonl`` (responses shown as a/b in a random order,
  so a human labeller is blind to the self-label) and waits for ``labels.jsonl`` beside it.
"""

from __future__ import annotations

import importlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spa_ray.judging.pair_selection import wilson_interval

__all__ = ["LabelAuditError", "Auditor", "make_auditor", "audit_summary"]

Auditor = Callable[[Sequence[str], Sequence[str], Sequence[str]], list]


class LabelAuditError(RuntimeError):
    """The self-labels disagree with the auditor too often to train on (or the audit could not run)."""


def make_auditor(spec: str, task: Any, request_dir: Path, wait_s: float, seed: int) -> Auditor:
    """The auditor ``audit.auditor`` names."""
    if spec == "gold":
        return _gold_auditor(task)
    if spec == "file":
        return lambda p, c, r: _file_audit(request_dir, p, c, r, wait_s=wait_s, seed=seed)
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LabelAuditError(f"audit.auditor={spec!r}: cannot import {name!r} from {module!r}: {exc}") from exc
    return function


def _gold_auditor(task: Any) -> Auditor:
    def audit(prompts, chosen, rejected):
        try:
            c, r = task.score_many(prompts, chosen), task.score_many(prompts, rejected)
        except NotImplementedError:
            raise LabelAuditError(
                f"audit.auditor=gold: task {getattr(task, 'name', task)!r} has no gold judge; set audit.auditor to "
                "file or module:function, or audit.pairs=0 to train without an audit"
            ) from None
        return [None if a == b else a > b for a, b in zip(c, r)]

    return audit


def _file_audit(folder: Path, prompts, chosen, rejected, wait_s: float, seed: int, poll_s: float = 2.0) -> list:
    """Write ``request.jsonl`` and wait for ``labels.jsonl`` ({"id", "preferred": "a"|"b"|"tie"}
    per line); a bad line raises naming the file, line and field."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    swapped = [rng.random() < 0.5 for _ in prompts]  # a/b order: the labeller cannot see the self-label
    request, labels_path = folder / "request.jsonl", folder / "labels.jsonl"
    lines = [json.dumps({"id": i, "prompt": p, "response_a": r if s else c, "response_b": c if s else r})
             for i, (p, c, r, s) in enumerate(zip(prompts, chosen, rejected, swapped))]
    if not request.exists():
        tmp = request.with_name(".tmp-request.jsonl")
        tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        tmp.replace(request)
    print(f"spa-ray: label audit: waiting for {labels_path} ({len(lines)} pairs in {request}; one line each: "
          '{"id": 0, "preferred": "a"} with a, b or tie)', flush=True)
    deadline = time.monotonic() + wait_s
    while not labels_path.exists():
        if time.monotonic() > deadline:
            raise LabelAuditError(f"label audit: no {labels_path} after audit.wait_s={wait_s:g} s; stopping "
                                  "before training (rerun the same command once the labels are there)")
        time.sleep(poll_s)
    preferred: dict[int, str] = {}
    for number, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabelAuditError(f"{labels_path}, line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), int) or not 0 <= row["id"] < len(lines):
            raise LabelAuditError(f"{labels_path}, line {number}: field 'id' must be an integer in [0, {len(lines)})")
        if row.get("preferred") not in ("a", "b", "tie"):
            raise LabelAuditError(f"{labels_path}, line {number}: field 'preferred' must be a, b or tie, "
                                  f"got {row.get('preferred')!r}")
        preferred[row["id"]] = row["preferred"]
    missing = [i for i in range(len(lines)) if i not in preferred]
    if missing:
        raise LabelAuditError(f"{labels_path}: no label for ids {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    # the self-label's chosen response is b when swapped
    return [None if preferred[i] == "tie" else (preferred[i] == ("b" if s else "a")) for i, s in enumerate(swapped)]


def audit_summary(verdicts: Sequence[bool | None], floor: float) -> dict[str, Any]:
    """Agreement among the pairs the auditor could decide, its 95% Wilson interval, and
    whether the run may go on: it stops only when the whole interval lies below ``floor``
    (the audit shows, at 95%, that the labels are worse than the floor). A point estimate
    would stop healthy runs by chance: 100 audited pairs at a true 0.62 read below 0.55 one
    time in ten."""
    bad = [v for v in verdicts if v is not None and type(v).__name__ not in ("bool", "bool_")]  # numpy's too
    if bad:
        raise LabelAuditError(f"label audit: the auditor returned {bad[:3]!r}; expected True, False or None per pair")
    decided = [bool(v) for v in verdicts if v is not None]
    agree = sum(decided)
    low, high = wilson_interval(agree, len(decided))
    agreement = agree / len(decided) if decided else float("nan")
    return {"audited": len(verdicts), "decided": len(decided), "agree": agree, "agreement": agreement,
            "ci_low": low, "ci_high": high, "floor": floor, "passed": high >= floor}
