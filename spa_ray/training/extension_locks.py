"""Stale build locks of torch C++ extensions: remove them so DeepSpeed's first init can't hang.

DeepSpeed compiles small ops (the shm communication op on CPU, fused optimizers on GPU) with
``torch.utils.cpp_extension`` on first use. Torch guards each build with a ``lock`` file in
the op's build folder and makes every other process wait until the file goes away. A process
killed mid-compile (a Ctrl-C, a preempted worker, a CI timeout) never removes it, and every
later run waits forever, silently, in ``FileBaton.wait``. A build takes about a minute here,
so a lock far older than any build is stale: it is removed with a warning naming it. A
watchdog keeps checking while DeepSpeed initialises, so a run that starts soon after the
kill waits until the lock turns stale, never forever.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: a lock older than this many seconds is stale (a build takes about 60 s on 2 CPU cores)
DEFAULT_STALE_AFTER_S = 900.0
STALE_AFTER_ENV = "SPA_RAY_EXTENSION_LOCK_STALE_S"


def extensions_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else torch's default root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_extension_locks(root: str | Path | None = None, stale_after_s: float | None = None,
                                warn: Callable[[str], None] = print, now: float | None = None) -> list[Path]:
    """Remove ``lock`` files under ``root`` (an op's build folder, or one level deeper as in
    torch's default ``py3X_cpu/<op>`` layout) older than ``stale_after_s`` (default: the
    ``SPA_RAY_EXTENSION_LOCK_STALE_S`` environment variable, else 900). Returns what it removed."""
    root = Path(root) if root is not None else extensions_root()
    if stale_after_s is None:
        stale_after_s = float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))
    now = time.time() if now is None else now
    removed = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
            if age < stale_after_s:
                continue
            lock.unlink()
        except FileNotFoundError:  # another worker removed it, or the build finished
            continue
        removed.append(lock)
        warn(f"[spa-ray] removed a stale torch extension build lock {lock} ({age:.0f}s old, older than "
             f"{stale_after_s:.0f}s: a build killed midway leaves it, and every later DeepSpeed init would "
             f"wait for it forever; set {STALE_AFTER_ENV} to change the age)")
    return removed


class StaleLockWatchdog:
    """``clear_stale_extension_locks`` now and every ``interval_s`` until ``stop()``: wrap
    the code that may build an op (``deepspeed.initialize``)."""

    def __init__(self, root: str | Path | None = None, interval_s: float = 30.0, **clear_kwargs) -> None:
        self.root, self.interval_s, self.clear_kwargs = root, interval_s, clear_kwargs
        self.removed: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stale-extension-locks", daemon=True)

    def _run(self) -> None:
        while True:
            self.removed += clear_stale_extension_locks(self.root, **self.clear_kwargs)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> StaleLockWatchdog:
        self._thread.start()
        return self

    def stop(self) -> list[Path]:
        self._stop.set()
        self._thread.join()
        return self.removed

    def __enter__(self) -> StaleLockWatchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
