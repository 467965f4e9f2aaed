"""The stage mailbox: how the driver hands training stages to a trainer group that stays up.

One long Ray Train ``fit()`` per job runs a command loop on every rank. The ranks cannot
be called from outside (Ray Train gives no handle on its workers), so they poll this
actor: the driver ``post``s a stage command; rank 0 takes it (``next_command``),
``begin``s it (one attempt) and ``assign``s its decision as the group's next step, which
every other rank reads (``assignment``) -- so all ranks run the same command even when a
command fails between their polls; rank 0 ``complete``s it with the stage's outcome. A
rank that raises ``fail``s it first (its traceback reaches the driver), then Ray Train
restarts the group and the new ranks find the same command still pending.

Reading a command does not consume it (unlike ``ray.util.queue.Queue``): a group that
restarts mid-stage must see it again. Ray Train's own failure budget belongs to the whole
``fit()`` (the whole job), so the per-stage budget lives here: a command that has begun
more than ``max_failures + 1`` times fails. Pure bookkeeping, no torch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

__all__ = ["StageMailbox", "PENDING", "DONE", "FAILED"]

PENDING, DONE, FAILED = "pending", "done", "failed"


@ray.remote(num_cpus=0, max_restarts=0)
class StageMailbox:
    def __init__(self, max_failures: int = 2):
        self.max_failures = int(max_failures)
        self.commands: dict[int, dict[str, Any]] = {}
        self.state: dict[int, dict[str, Any]] = {}
        self.stopped = False
        self.group_starts = 0
        self.assignments: dict[tuple[int, int], dict[str, Any]] = {}  # (group, step) -> rank 0's decision
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, ready, timeout_s: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    # -- driver side ---------------------------------------------------------------
    async def post(self, payload: dict[str, Any], kind: str = "stage") -> int:
        """A new command (``kind``: "stage", or "warm": load the next stage's weights); returns
        its id (ids increase)."""
        command_id = max(self.commands, default=-1) + 1
        self.commands[command_id] = {"id": command_id, "kind": kind, "payload": payload}
        self.state[command_id] = {"status": PENDING, "attempts": 0, "errors": [], "posted": time.time()}
        await self._notify()
        return command_id

    async def stop(self) -> None:
        """Every rank returns from its loop at its next poll; the ``fit()`` ends."""
        self.stopped = True
        await self._notify()

    async def wait_result(self, command_id: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """The command's state once done or failed, or its pending state after ``timeout_s``."""
        await self._wait(lambda: self.state[command_id]["status"] != PENDING, timeout_s)
        return dict(self.state[command_id])

    # -- rank side -----------------------------------------------------------------
    async def group_started(self) -> int:
        """Rank 0 of each (re)started group calls this; returns how many groups started."""
        self.group_starts += 1
        return self.group_starts

    async def next_command(self, after_id: int, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """The oldest pending command with an id above ``after_id``, ``{"kind": "stop"}``
        once stopped, or None after ``timeout_s`` (poll again: no collective is held)."""

        def found():
            if self.stopped:
                return {"kind": "stop"}
            for command_id in sorted(self.commands):
                if command_id > after_id and self.state[command_id]["status"] == PENDING:
                    return self.commands[command_id]
            return None

        await self._wait(lambda: found() is not None, timeout_s)
        return found()

    async def assign(self, group: int, step: int, decision: dict[str, Any]) -> None:
        """Rank 0: what every rank of group ``group`` does at its ``step``-th command."""
        self.assignments[(group, step)] = decision
        await self._notify()

    async def assignment(self, group: int, step: int, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """The other ranks: rank 0's decision for ``step``, or None after ``timeout_s`` (poll again)."""
        await self._wait(lambda: (group, step) in self.assignments, timeout_s)
        return self.assignments.get((group, step))

    async def begin(self, command_id: int) -> bool:
        """One attempt at the command (rank 0); False once the stage's budget is spent."""
        s = self.state[command_id]
        if s["status"] != PENDING:
            return False
        s["attempts"] += 1
        if s["attempts"] > self.max_failures + 1:
            s["status"] = FAILED
            s["error"] = (f"{s['attempts'] - 1} failed attempts (the per-stage budget is "
                          f"{self.max_failures} restarts); last error: {s['errors'][-1] if s['errors'] else 'none reported (a worker process died)'}")
            await self._notify()
            return False
        return True

    async def complete(self, command_id: int, outcome: dict[str, Any]) -> None:
        s = self.state[command_id]
        if s["status"] == PENDING:
            s.update(status=DONE, outcome=outcome, finished=time.time())
            for older in self.state:  # hold only the newest weights (the refs keep objects alive)
                if older < command_id and "outcome" in self.state[older]:
                    self.state[older]["outcome"].pop("weights", None)
            await self._notify()

    async def fail(self, command_id: int, rank: int, error: str, fatal: bool = False) -> None:
        """A rank's exception. ``fatal`` (e.g. a non-finite loss): no retry, the stage fails now."""
        s = self.state[command_id]
        s["errors"].append(f"rank {rank}: {error}")
        if fatal and s["status"] == PENDING:
            s.update(status=FAILED, error=error, fatal=True)
            await self._notify()
