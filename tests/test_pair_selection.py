"""Pair selection for self-labels (issue #21): pair rules, the confidence filter, seed
replay, the audit sample and its interval. Pure functions, no Ray."""

import math
import random

import pytest

from spa_ray.judging.pair_selection import (
    audit_indices, confident_mask, pick_pair, replay_indices, scored_sample_pairs, wilson_interval,
)


def test_scored_pairs_cover_every_sample_once_for_max_min():
    assert scored_sample_pairs(2, "first_two") == [(0, 1)]
    assert scored_sample_pairs(4, "first_two") == [(0, 1)]  # the paper judges two samples only
    assert scored_sample_pairs(4, "max_min") == [(0, 1), (2, 3)]
    assert scored_sample_pairs(5, "max_min") == [(0, 1), (2, 3), (4, 0)]
    for n in range(2, 9):
        covered = {i for pair in scored_sample_pairs(n, "max_min") for i in pair}
        assert covered == set(range(n))
    with pytest.raises(ValueError, match="pair rule"):
        scored_sample_pairs(4, "best_of")
    with pytest.raises(ValueError, match=">= 2 samples"):
        scored_sample_pairs(1, "max_min")


def test_pick_pair_rules_and_ties():
    assert pick_pair([0.2, 0.7], "first_two") == (1, 0)
    assert pick_pair([0.7, 0.2, 9.0, -3.0], "first_two") == (0, 1)  # later samples ignored
    assert pick_pair([0.7, 0.2, 9.0, -3.0], "max_min") == (2, 3)
    assert pick_pair([1.0, 1.0], "first_two") is None
    assert pick_pair([1.0, 1.0, 1.0], "max_min") is None
    # equal highest rewards: the first one; equal lowest: the first one
    assert pick_pair([5.0, 0.0, 5.0, 0.0], "max_min") == (0, 1)
    with pytest.raises(ValueError, match="finite"):
        pick_pair([1.0, math.nan], "max_min")


def test_max_min_margin_is_at_least_first_two_margin():
    rng = random.Random(0)
    for _ in range(200):
        r = [rng.gauss(0, 1) for _ in range(4)]
        w, l = pick_pair(r, "max_min")
        a, b = pick_pair(r, "first_two")
        assert r[w] - r[l] >= r[a] - r[b]


def test_confident_mask_keeps_the_largest_margins():
    margins = [0.1, 0.9, 0.5, 0.5, 0.0, 2.0]
    assert confident_mask(margins) == [True] * 6  # the paper: everything
    assert confident_mask(margins, keep_fraction=0.5) == [False, True, True, False, False, True]
    assert confident_mask(margins, min_margin=0.5) == [False, True, True, True, False, True]
    assert confident_mask(margins, keep_fraction=0.5, min_margin=1.0) == [False, False, False, False, False, True]
    assert sum(confident_mask([1.0] * 10, keep_fraction=0.25)) == round(2.5)
    # the random control: as many pairs, not the largest margins; the same per seed
    wide = [float(i) for i in range(100)]
    random_kept = confident_mask(wide, keep_fraction=0.25, keep_by="random", seed=3)
    assert sum(random_kept) == 25 and random_kept == confident_mask(wide, 0.25, keep_by="random", seed=3)
    assert random_kept != confident_mask(wide, 0.25) and random_kept != confident_mask(wide, 0.25, keep_by="random", seed=4)
    assert sum(confident_mask(wide, 0.25, min_margin=50.0, keep_by="random", seed=3)) < 25  # min_margin still applies
    with pytest.raises(ValueError, match="keep_by"):
        confident_mask(wide, keep_by="largest")
    with pytest.raises(ValueError, match="keep_fraction"):
        confident_mask(margins, keep_fraction=0.0)
    with pytest.raises(ValueError, match="margins"):
        confident_mask([0.1, math.nan])


def test_replay_share_and_determinism():
    picked = replay_indices(num_seed=50, num_self=300, share=0.25, seed=3)
    assert len(picked) == 100 and len(picked) / (len(picked) + 300) == 0.25
    assert len(set(picked)) == 50  # past the seed set: a second permutation, every pair used
    assert picked == replay_indices(50, 300, 0.25, seed=3)
    assert picked != replay_indices(50, 300, 0.25, seed=4)
    small = replay_indices(num_seed=1000, num_self=90, share=0.1, seed=0)
    assert len(small) == 10 and len(set(small)) == 10
    assert replay_indices(10, 300, 0.0, seed=0) == []
    with pytest.raises(ValueError, match="share"):
        replay_indices(10, 10, 1.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        replay_indices(0, 10, 0.5, seed=0)


def test_audit_sample_and_wilson_interval():
    picked = audit_indices(range(100, 200), 10, seed=1)
    assert len(picked) == 10 and picked == sorted(picked) and set(picked) <= set(range(100, 200))
    assert picked == audit_indices(range(100, 200), 10, seed=1)
    assert audit_indices([3, 1], 10, seed=0) == [1, 3]
    low, high = wilson_interval(65, 100)
    assert 0.55 < low < 0.65 < high < 0.75
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] > 0.65
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
