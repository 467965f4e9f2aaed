"""From samples and judge labels to D_t (issue #21): pair rules over generation rows, the
kept and audit marks, and seed replay into the training table. Pure bookkeeping, no Ray."""

import math

import pytest

from spa_ray.pipeline.self_labels import judge_rows, mark_pairs, ordered_pairs, training_table


def _gen(rewards_per_prompt):
    """Generation rows, shuffled within each prompt (sample_index gives the order)."""
    gen = {k: [] for k in ("prompt_index", "sample_index", "prompt", "prompt_ids", "response_ids", "text")}
    for p, rewards in enumerate(rewards_per_prompt):
        for s in reversed(range(len(rewards))):
            gen["prompt_index"].append(p)
            gen["sample_index"].append(s)
            gen["prompt"].append(f"q{p}")
            gen["prompt_ids"].append([p])
            gen["response_ids"].append([p, s])
            gen["text"].append(f"q{p}-s{s}")
    return gen


def _labels(gen, order, rewards_per_prompt):
    """What the judge returns for each row: rewards of its two samples and Eq. 8's label."""
    out = []
    for a, b in order:
        r1 = rewards_per_prompt[gen["prompt_index"][a]][gen["sample_index"][a]]
        r2 = rewards_per_prompt[gen["prompt_index"][b]][gen["sample_index"][b]]
        out.append({"reward_1": r1, "reward_2": r2, "is_tie": r1 == r2, "first_is_chosen": r1 > r2,
                    "probability": 1 / (1 + math.exp(-(r1 - r2)))})
    return out


REWARDS = [[0.1, 0.5, 2.0, -1.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.5, 0.7]]


def test_first_two_is_the_papers_pair():
    gen = _gen(REWARDS)
    order, rows = judge_rows(gen, "first_two", False, where="test")
    assert len(rows) == 3 and [r["response_2"] for r in rows] == ["q0-s1", "q1-s1", "q2-s1"]
    pairs, stats = ordered_pairs(gen, order, _labels(gen, order, REWARDS), "first_two")
    assert pairs["chosen"] == ["q0-s1", "q2-s0"] and pairs["rejected"] == ["q0-s0", "q2-s1"]
    assert stats["ties"] == 1
    assert pairs["margin"] == pytest.approx([0.4, 1.0])
    assert pairs["probability"] == pytest.approx([1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(-1.0))])


def test_max_min_takes_the_highest_against_the_lowest_of_all_samples():
    gen = _gen(REWARDS)
    order, rows = judge_rows(gen, "max_min", False, where="test")
    assert len(rows) == 6  # two rows per prompt cover 4 samples
    pairs, stats = ordered_pairs(gen, order, _labels(gen, order, REWARDS), "max_min")
    assert pairs["chosen"] == ["q0-s2", "q2-s0"] and pairs["rejected"] == ["q0-s3", "q2-s1"]
    assert pairs["margin"] == pytest.approx([3.0, 1.0]) and stats["ties"] == 1
    assert pairs["chosen_ids"] == [[0, 2], [2, 0]] and pairs["prompt_ids"] == [[0], [2]]


def test_marks_and_training_table_with_replay():
    judged = {"prompt_ids": [[i] for i in range(10)], "chosen_ids": [[1]] * 10, "rejected_ids": [[2]] * 10,
              "margin": [float(i) for i in range(10)], "reward_chosen": [0.0] * 10, "reward_rejected": [0.0] * 10,
              "probability": [0.6] * 10}
    kept, audited = mark_pairs(judged["margin"], keep_fraction=0.8, min_margin=0.0, audit_pairs=5, seed=0)
    assert kept == [False] * 2 + [True] * 8
    # 5 asked, but at most a quarter of the 10 judged pairs are audited
    assert sum(audited) == 2
    # the audit draws from every judged pair, kept or not: over seeds, dropped pairs are drawn too
    draws = [mark_pairs(judged["margin"], 0.8, 0.0, 2, seed=s)[1] for s in range(40)]
    assert any(a[0] or a[1] for a in draws) and all(sum(a) == 2 for a in draws)
    seed_pairs = {"prompt_ids": [[100 + i] for i in range(5)], "chosen_ids": [[7]] * 5, "rejected_ids": [[8]] * 5,
                  "truncated_tokens": [0] * 5}
    table = training_table(judged, kept, audited, seed_pairs, replay_share=0.25, seed=0)
    trained = [i for i in range(10) if kept[i] and not audited[i]]
    n = len(trained)  # 6, 7 or 8: kept and unaudited
    assert table["source"] == ["self"] * n + ["seed"] * round(n / 3)  # seed pairs = 25% of the table
    assert table["prompt_ids"][:n] == [[i] for i in trained]
    assert table["prompt_ids"][n][0] >= 100 and table["probability"][n] == 1.0 and table["margin"][n] is None
    assert "truncated_tokens" not in table
    # the paper's setting: everything judged is trained on, nothing added
    kept, audited = mark_pairs(judged["margin"], 1.0, 0.0, 0, seed=0)
    assert training_table(judged, kept, audited, seed_pairs, 0.0, seed=0)["prompt_ids"] == judged["prompt_ids"]
