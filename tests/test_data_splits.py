"""The paper's seed / iteration / held-out split: sizes, determinism, disjointness, and
user-supplied split files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spa_ray.data import (
    DataError,
    PreferencePair,
    PromptRecord,
    SplitConfig,
    assert_disjoint,
    load_ultrafeedback,
    load_user_splits,
    split_pairs,
    split_sizes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"


def synthetic(n: int) -> list[PreferencePair]:
    return [PreferencePair(f"prompt {i}", f"good {i}", f"bad {i}", file="syn.jsonl", row=i) for i in range(n)]


def test_default_sizes_reproduce_the_paper():
    s = split_sizes(60917)  # argilla/ultrafeedback-binarized-preferences-cleaned
    assert s.holdout == 914 and s.seed == 2000 and s.iterations == (8000, 20001, 30002) and s.unused == 0
    assert s.total == 60917
    assert abs(s.seed / (60917 - s.holdout) - 0.033) < 0.001  # "3.3% of 60K"


@pytest.mark.parametrize("n", list(range(0, 130)) + [999, 60000])
def test_sizes_always_partition_n(n):
    for cfg in (SplitConfig(), SplitConfig(seed_fraction=0.1, iteration_fractions=(0.2, 0.3), holdout_fraction=0.0)):
        s = split_sizes(n, cfg)
        assert s.total == n and min(s.holdout, s.seed, s.unused, *s.iterations) >= 0


def test_fractions_respected():
    cfg = SplitConfig(seed_fraction=0.05, iteration_fractions=(0.1, 0.25), holdout_fraction=0.1, shuffle_seed=3)
    sp = split_pairs(synthetic(6000), cfg)
    assert len(sp.holdout) == 600
    pool = 5400
    assert len(sp.seed) == 270
    assert [len(x) for x in sp.iterations] == [540, 1350]
    assert len(sp.unused) == pool - 270 - 540 - 1350
    assert sum(sp.sizes().values()) == 6000


def test_split_disjoint_deterministic_and_typed(tmp_path):
    data = load_ultrafeedback(FIXTURE, cache_dir=str(tmp_path / "hf"))
    a = split_pairs(list(data))
    b = split_pairs(list(data))
    c = split_pairs(list(data), SplitConfig(shuffle_seed=1))
    key = lambda sp: {k: [r.prompt for r in v] for k, v in sp.named_sets().items()}  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    a.assert_disjoint()
    sets = key(a)
    all_prompts = [p for v in sets.values() for p in v]
    assert len(all_prompts) == len(set(all_prompts)) == len(data)
    assert all(isinstance(p, PreferencePair) for p in a.seed + a.holdout)
    assert all(isinstance(p, PromptRecord) for it in a.iterations for p in it)
    assert all(p.row is not None and p.file for it in a.iterations for p in it)  # provenance kept
    s = split_sizes(len(data))
    assert [len(x) for x in a.iterations] == list(s.iterations) and len(a.seed) == s.seed


def test_changing_seed_fraction_keeps_iteration_prompt_sets():
    pairs = synthetic(3000)
    base = split_pairs(pairs, SplitConfig(seed_fraction=2 / 60, iteration_fractions=(8 / 60, 20 / 60)))
    for f in (0.008, 0.017, 0.1):
        other = split_pairs(pairs, SplitConfig(seed_fraction=f, iteration_fractions=(8 / 60, 20 / 60)))
        assert [[r.prompt for r in x] for x in other.iterations] == [[r.prompt for r in x] for x in base.iterations]
        assert other.holdout == base.holdout


def test_duplicate_prompts_are_dropped_before_splitting():
    pairs = synthetic(100) + [PreferencePair("prompt 5", "x", "y"), PreferencePair("  prompt 7 ", "x", "y")]
    sp = split_pairs(pairs)
    assert sp.duplicates_dropped == 2 and sum(sp.sizes().values()) == 100


def test_bad_config():
    with pytest.raises(ValueError, match="> 1"):
        SplitConfig(seed_fraction=0.5, iteration_fractions=(0.3, 0.3))
    with pytest.raises(ValueError):
        SplitConfig(holdout_fraction=-0.1)
    with pytest.raises(ValueError):
        SplitConfig(holdout_fraction=1.0)


def test_assert_disjoint_names_prompt_sets_file_and_row():
    a = [PromptRecord("alpha", file="x1.jsonl", row=0), PromptRecord("beta", file="x1.jsonl", row=1)]
    b = [PromptRecord("gamma", file="x2.jsonl", row=0), PromptRecord("beta ", file="x2.jsonl", row=1)]
    assert_disjoint({"a": a, "b": b[:1]})
    with pytest.raises(DataError) as ei:
        assert_disjoint({"iteration_1": a, "iteration_2": b})
    msg = str(ei.value)
    assert "'beta" in msg and "x2.jsonl" in msg and "row 1" in msg and "'prompt'" in msg
    assert "iteration_1" in msg and "iteration_2" in msg and "x1.jsonl row 1" in msg


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_user_supplied_split_files(tmp_path):
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    cache = str(tmp_path / "hf")
    seed = _write(tmp_path / "seed.jsonl", rows[:5])
    x1 = _write(tmp_path / "x1.jsonl", [{"prompt": r["prompt"]} for r in rows[5:15]])
    x2 = _write(tmp_path / "x2_pairs.jsonl", rows[15:30])  # a preference file used for its prompts
    hold = _write(tmp_path / "hold.jsonl", [{"prompt": r["prompt"]} for r in rows[30:]])
    sp = load_user_splits(seed, [x1, x2], hold, cache_dir=cache)
    assert sp.sizes() == {"seed": 5, "iteration_1": 10, "iteration_2": 15, "holdout": 10, "unused": 0}

    # row 3 of x2 repeats a prompt of x1 (row 2 there)
    bad_rows = rows[15:30]
    bad_rows[3] = dict(bad_rows[3], prompt=rows[7]["prompt"])
    for side in ("chosen", "rejected"):
        bad_rows[3][side] = [dict(bad_rows[3][side][0], content=rows[7]["prompt"]), bad_rows[3][side][1]]
    x2_bad = _write(tmp_path / "x2_bad.jsonl", bad_rows)
    with pytest.raises(DataError) as ei:
        load_user_splits(seed, [x1, x2_bad], hold, cache_dir=cache)
    err = ei.value
    msg = str(err)
    assert rows[7]["prompt"][:30] in msg
    assert "x2_bad.jsonl" in msg and "row 3" in msg and "'prompt'" in msg
    assert "x1.jsonl row 2" in msg
    assert err.file.endswith("x2_bad.jsonl") and err.row == 3 and err.field == "prompt"

    # the seed file overlapping the hold-out file is caught too
    hold_bad = _write(tmp_path / "hold_bad.jsonl", [{"prompt": rows[0]["prompt"]}])
    with pytest.raises(DataError, match="seed"):
        load_user_splits(seed, [x1], hold_bad, cache_dir=cache)
