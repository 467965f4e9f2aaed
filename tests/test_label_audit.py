"""The label audit's auditors and its pass/stop figure (issue #21): real files, a real
import path, the embedded task's gold judge. The stop in a real loop: test_label_audit_stop.py."""

import json
import threading
import time

import pytest

from spa_ray.pipeline.label_audit import LabelAuditError, audit_summary, make_auditor


def agree_with_longer(prompts, chosen, rejected):
    """An auditor by import path (tests.test_label_audit:agree_with_longer): the longer response wins."""
    return [None if len(c) == len(r) else len(c) > len(r) for c, r in zip(chosen, rejected)]


def test_summary_interval_and_floor():
    s = audit_summary([True] * 7 + [False] * 3 + [None] * 5, floor=0.6)
    assert (s["audited"], s["decided"], s["agree"]) == (15, 10, 7)
    assert s["agreement"] == 0.7 and s["ci_low"] < 0.7 < s["ci_high"] and s["passed"]
    # it stops only when the whole 95% interval lies below the floor
    assert audit_summary([True] * 4 + [False] * 6, floor=0.5)["passed"]  # 0.4 of 10: could be chance
    low = audit_summary([True] * 34 + [False] * 66, floor=0.5)  # the lr 1e-4 collapse: 0.34 of 100
    assert not low["passed"] and low["ci_high"] < 0.5
    assert audit_summary([None, None], floor=0.5)["passed"]  # nothing decided: no evidence against the labels
    with pytest.raises(LabelAuditError, match="expected True, False or None"):
        audit_summary([1.0], floor=0.5)


def test_function_auditor_by_import_path(tmp_path):
    audit = make_auditor("test_label_audit:agree_with_longer", None, tmp_path, 1.0, seed=0)
    assert audit(["q", "q", "q"], ["long one", "ab", "x"], ["short", "abc", "y"]) == [True, False, None]
    with pytest.raises(LabelAuditError, match="cannot import"):
        make_auditor("no_such_module_xyz:f", None, tmp_path, 1.0, seed=0)


def test_gold_auditor_uses_the_task_and_names_a_task_without_one(tmp_path):
    from spa_ray.tasks.embedded import EmbeddedTask

    task = EmbeddedTask()
    prompt = task.prompt_splits(seed=0).iterations[0][0]
    good, bad = task.seed_pairs([prompt], seed=0)[0].chosen, task.seed_pairs([prompt], seed=0)[0].rejected
    audit = make_auditor("gold", task, tmp_path, 1.0, seed=0)
    assert audit([prompt, prompt], [good, bad], [bad, good]) == [True, False]

    class NoGold:
        name = "no-gold"

        def score_many(self, prompts, responses):
            raise NotImplementedError

    with pytest.raises(LabelAuditError, match="has no gold judge"):
        make_auditor("gold", NoGold(), tmp_path, 1.0, seed=0)(["q"], ["a"], ["b"])


def test_file_auditor_waits_for_blind_labels(tmp_path):
    chosen, rejected = ["c0", "c1", "c2"], ["r0", "r1", "r2"]

    def labeller():  # a human who prefers c0 and c2, finds 1 a tie
        request = tmp_path / "request.jsonl"
        while not request.exists():
            time.sleep(0.05)
        lines = [json.loads(x) for x in request.read_text().splitlines()]
        out = []
        for row in lines:
            pick = {"0": "c0", "1": None, "2": "c2"}[str(row["id"])]
            preferred = "tie" if pick is None else ("a" if row["response_a"] == pick else "b")
            out.append(json.dumps({"id": row["id"], "preferred": preferred}))
        (tmp_path / "labels.jsonl").write_text("\n".join(out) + "\n")

    thread = threading.Thread(target=labeller)
    thread.start()
    verdicts = make_auditor("file", None, tmp_path, 30.0, seed=3)(["q"] * 3, chosen, rejected)
    thread.join()
    assert verdicts == [True, None, True]
    lines = [json.loads(x) for x in (tmp_path / "request.jsonl").read_text().splitlines()]
    assert {"response_a", "response_b"} <= set(lines[0]) and "chosen" not in lines[0]  # blind


def test_file_auditor_names_the_bad_line_and_times_out(tmp_path):
    (tmp_path / "labels.jsonl").write_text('{"id": 0, "preferred": "a"}\n{"id": 1, "preferred": "left"}\n')
    with pytest.raises(LabelAuditError, match=r"labels.jsonl, line 2: field 'preferred'"):
        make_auditor("file", None, tmp_path, 5.0, seed=0)(["q", "q"], ["a", "b"], ["c", "d"])
    empty = tmp_path / "never"
    with pytest.raises(LabelAuditError, match="audit.wait_s"):
        make_auditor("file", None, empty, 0.1, seed=0)(["q"], ["a"], ["b"])
    assert (empty / "request.jsonl").exists()  # the request stays for the labeller
