"""Waiting on many Ray calls under one deadline, and saying in one line why one failed."""

from __future__ import annotations

import time

import ray

__all__ = ["wait_calls", "failure_reason"]


def wait_calls(calls: dict, timeout_s: float | None) -> tuple[dict, dict]:
    """Await refs -> key; returns ({key: (result, seconds)}, {key: reason}) for failures."""
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + float(timeout_s)
    done: dict = {}
    failed: dict = {}
    remaining = list(calls)
    while remaining:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=left)
        for ref in ready:
            key = calls[ref]
            try:
                done[key] = (ray.get(ref), time.monotonic() - t0)
            except Exception as exc:  # RayActorError, RayTaskError(WeightsMismatchError), ...
                failed[key] = failure_reason(exc)
    for ref in remaining:
        failed[calls[ref]] = f"timed out after {timeout_s} s"
    return done, failed


def failure_reason(exc: BaseException) -> str:
    """One line saying why a call failed (the actor's own exception for a RayTaskError)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
