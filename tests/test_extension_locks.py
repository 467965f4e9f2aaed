"""A torch extension build lock left by a killed build is removed; a live one is kept."""

import os
import time

from spa_ray.training.extension_locks import StaleLockWatchdog, clear_stale_extension_locks


def _lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_stale_locks_go_live_ones_stay(tmp_path):
    stale = _lock(tmp_path / "deepspeed_shm_comm" / "lock", 3600)
    nested = _lock(tmp_path / "py312_cpu" / "fused_adam" / "lock", 3600)  # torch's default layout
    live = _lock(tmp_path / "cpu_adam" / "lock", 30)
    built = _lock(tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so", 3600)
    warnings = []
    removed = clear_stale_extension_locks(tmp_path, stale_after_s=900, warn=warnings.append)
    assert sorted(removed) == sorted([stale, nested])
    assert not stale.exists() and not nested.exists()
    assert live.exists() and built.exists()  # a build in progress and a finished op are untouched
    assert len(warnings) == 2 and all("stale" in w and "SPA_RAY_EXTENSION_LOCK_STALE_S" in w for w in warnings)
    assert str(stale) in "".join(warnings)
    assert clear_stale_extension_locks(tmp_path, stale_after_s=900, warn=warnings.append) == []


def test_age_comes_from_the_environment(tmp_path, monkeypatch):
    lock = _lock(tmp_path / "op" / "lock", 120)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("SPA_RAY_EXTENSION_LOCK_STALE_S", "600")
    assert clear_stale_extension_locks(warn=lambda m: None) == [] and lock.exists()
    monkeypatch.setenv("SPA_RAY_EXTENSION_LOCK_STALE_S", "60")
    assert clear_stale_extension_locks(warn=lambda m: None) == [lock] and not lock.exists()


def test_a_missing_root_is_nothing_to_clear(tmp_path):
    assert clear_stale_extension_locks(tmp_path / "never-built", warn=lambda m: None) == []


def test_watchdog_removes_a_lock_once_it_turns_stale(tmp_path):
    """A run started soon after the kill meets a young lock: it waits until the lock is
    stale, not forever."""
    lock = _lock(tmp_path / "deepspeed_shm_comm" / "lock", 0)
    with StaleLockWatchdog(tmp_path, interval_s=0.05, stale_after_s=0.5, warn=lambda m: None) as watchdog:
        assert lock.exists()  # young: kept at first
        deadline = time.time() + 10
        while lock.exists() and time.time() < deadline:
            time.sleep(0.05)
    assert not lock.exists() and watchdog.removed == [lock]
