"""The stage mailbox's protocol, on a real actor (no training): what the ranks and the
driver see when commands are posted, begun, assigned, completed and failed."""

import pytest
import ray

from spa_ray.training.mailbox import DONE, FAILED, PENDING, StageMailbox


@pytest.fixture
def mailbox(ray_local):
    box = StageMailbox.remote(max_failures=1)
    yield box
    ray.kill(box)


def _get(ref):
    return ray.get(ref, timeout=30)


def test_commands_are_read_without_being_consumed_until_done(mailbox):
    assert _get(mailbox.next_command.remote(-1, 0.1)) is None  # nothing posted: the poll times out
    first = _get(mailbox.post.remote({"stage": "a"}))
    second = _get(mailbox.post.remote({"stage": "b"}))
    # a restarted group (after=-1) finds the oldest command still pending, as often as it asks
    for _ in range(2):
        assert _get(mailbox.next_command.remote(-1, 0.1))["id"] == first
    assert _get(mailbox.next_command.remote(first, 0.1))["id"] == second
    assert _get(mailbox.begin.remote(first)) is True
    _get(mailbox.complete.remote(first, {"weights": "ref-a", "steps": 3}))
    assert _get(mailbox.next_command.remote(-1, 0.1))["id"] == second  # done commands are skipped
    state = _get(mailbox.wait_result.remote(first, 0.1))
    assert state["status"] == DONE and state["outcome"] == {"weights": "ref-a", "steps": 3}
    # completing a newer command drops the older one's weights (a ref there would keep the object alive)
    _get(mailbox.complete.remote(second, {"weights": "ref-b"}))
    assert "weights" not in _get(mailbox.wait_result.remote(first, 0.1))["outcome"]
    assert _get(mailbox.wait_result.remote(second, 0.1))["outcome"] == {"weights": "ref-b"}


def test_the_per_stage_budget_counts_attempts_and_names_the_last_error(mailbox):
    command = _get(mailbox.post.remote({"stage": "a"}))
    assert _get(mailbox.begin.remote(command)) is True
    _get(mailbox.fail.remote(command, 1, "boom 1"))
    assert _get(mailbox.wait_result.remote(command, 0.1))["status"] == PENDING  # not fatal: retried
    assert _get(mailbox.begin.remote(command)) is True  # max_failures=1: one restart allowed
    _get(mailbox.fail.remote(command, 0, "boom 2"))
    assert _get(mailbox.begin.remote(command)) is False
    state = _get(mailbox.wait_result.remote(command, 0.1))
    assert state["status"] == FAILED and state["attempts"] == 3
    assert state["error"].startswith("2 failed attempts") and "rank 0: boom 2" in state["error"]
    assert _get(mailbox.next_command.remote(-1, 0.1)) is None


def test_a_fatal_failure_ends_the_stage_at_once(mailbox):
    command = _get(mailbox.post.remote({"stage": "a"}))
    _get(mailbox.begin.remote(command))
    _get(mailbox.fail.remote(command, 0, "non-finite loss", fatal=True))
    state = _get(mailbox.wait_result.remote(command, 0.1))
    assert (state["status"], state["fatal"], state["error"]) == (FAILED, True, "non-finite loss")


def test_ranks_follow_rank_0s_assignment_and_stop(mailbox):
    group = _get(mailbox.group_started.remote())
    waiting = mailbox.assignment.remote(group, 0, 5.0)  # a rank waits before rank 0 decides
    _get(mailbox.assign.remote(group, 0, {"command": {"kind": "stage", "id": 0}, "proceed": False}))
    assert _get(waiting) == {"command": {"kind": "stage", "id": 0}, "proceed": False}
    assert _get(mailbox.assignment.remote(group + 1, 0, 0.1)) is None  # another group's steps are its own
    _get(mailbox.stop.remote())
    assert _get(mailbox.next_command.remote(-1, 0.1)) == {"kind": "stop"}
