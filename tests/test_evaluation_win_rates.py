"""spa_ray.evaluation.win_rates against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spa_ray.evaluation.win_rates import (
    fit_length_controlled,
    gold_win_rate,
    implicit_reward_accuracy,
    length_controlled_win_rate,
    mean_length,
    pairwise_outcomes,
)


def test_gold_win_rate_ties_half():
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert gold_win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0]) == pytest.approx(0.625)
    assert gold_win_rate(torch.tensor([1.0]), torch.tensor([0.0])) == 1.0
    assert pairwise_outcomes([1, 2, 3], [3, 2, 1]).tolist() == [0.0, 0.5, 1.0]


def test_implicit_reward_accuracy_ties_half():
    assert implicit_reward_accuracy([0.5, -1.0, 0.0], [0.1, 2.0, 0.0]) == pytest.approx(0.5)
    assert implicit_reward_accuracy(np.array([2.0, 3.0]), np.array([1.0, 1.0])) == 1.0


def test_mean_length():
    assert mean_length([3, 5, 10]) == pytest.approx(6.0)
    assert mean_length([[1, 2], [1, 2, 3, 4]]) == pytest.approx(3.0)
    assert mean_length(torch.tensor([2, 4])) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        mean_length([])


def test_input_validation():
    with pytest.raises(ValueError, match="mismatch"):
        gold_win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        gold_win_rate([float("nan")], [1.0])
    with pytest.raises(ValueError, match="empty"):
        gold_win_rate([], [])
    with pytest.raises(ValueError, match="mismatch"):
        length_controlled_win_rate([1, 2], [0, 0], [1, 2, 3], [1, 2, 3])


def test_lc_equals_raw_when_lengths_equal():
    p = [1.0, 0.0, 2.0, 3.0, 1.0, 0.5, 0.5]
    b = [0.0, 1.0, 2.0, 1.0, 2.0, 0.0, 0.5]
    raw = gold_win_rate(p, b)  # (1 + 0 + .5 + 1 + 0 + 1 + .5) / 7
    assert raw == pytest.approx(4.0 / 7.0)
    lens = [10] * 7
    assert length_controlled_win_rate(p, b, lens, lens) == pytest.approx(raw, abs=1e-9)
    # all differences equal (not zero): the length effect is not identifiable; the ridge
    # on the slope picks slope 0, i.e. the raw win rate
    assert length_controlled_win_rate(p, b, [12] * 7, lens) == pytest.approx(raw, abs=1e-6)


def test_lc_hand_fit_two_groups():
    # Two length-difference groups x = +d and -d. The saturated logistic fit gives
    # logit(w+) = a + b, logit(w-) = a - b, so a = (logit(w+) + logit(w-)) / 2.
    # Group +d: 8 wins 2 losses (w = .8); group -d: 4 wins 6 losses (w = .4).
    pol = [1] * 8 + [0] * 2 + [1] * 4 + [0] * 6
    base = [0.5] * 20  # scores 1 / 0 against 0.5: wins / losses
    lp = [20] * 10 + [10] * 10
    lb = [10] * 10 + [20] * 10
    logit = lambda w: math.log(w / (1 - w))  # noqa: E731
    a = (logit(0.8) + logit(0.4)) / 2
    fit = fit_length_controlled(pol, base, lp, lb, ridge=1e-12)
    assert fit.converged
    assert fit.intercept == pytest.approx(a, abs=1e-6)
    assert fit.win_rate == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-6)
    assert fit.raw_win_rate == pytest.approx(0.6)
    assert fit.scale == pytest.approx(10.0)  # std of +-10
    assert fit.slope == pytest.approx((logit(0.8) - logit(0.4)) / 2, abs=1e-6)


def test_lc_ties_count_half_each_way():
    # A tie is the same as one win and one loss at half weight: these two data sets give
    # the same fit (second one duplicates each pair, turning each tie into a win + a loss).
    pol = [1, 0, 0.5, 1, 0.5]
    base = [0, 1, 0.5, 0, 0.5]
    lp = [12, 8, 14, 9, 11]
    lb = [10, 10, 10, 10, 10]
    f1 = fit_length_controlled(pol, base, lp, lb)
    pol2 = [1, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    base2 = [0, 0, 1, 1, 0, 1, 0, 0, 0, 1]
    lp2 = [12, 12, 8, 8, 14, 14, 9, 9, 11, 11]
    f2 = fit_length_controlled(pol2, base2, lp2, [10] * 10)
    assert f1.win_rate == pytest.approx(f2.win_rate, abs=1e-7)
    assert f1.slope == pytest.approx(f2.slope, abs=1e-6)


def test_lc_removes_a_length_confound():
    # Synthetic judge that only rewards length: P(policy wins) = sigmoid(2 * d), d the
    # standardised length difference, with the policy usually longer (d ~ N(1.5, 1)).
    # Raw win rate is high (~0.9); at equal length the policy is a coin flip, so LC ~ 0.5.
    rng = np.random.default_rng(0)
    n = 4000
    d = rng.normal(1.5, 1.0, n)
    lb = np.full(n, 200.0)
    lp = lb + 40.0 * d
    wins = rng.random(n) < 1 / (1 + np.exp(-2 * (lp - lb) / 40.0))
    pol, base = wins.astype(float), np.full(n, 0.5)
    raw = gold_win_rate(pol, base)
    lc = length_controlled_win_rate(pol, base, lp, lb)
    assert raw > 0.8
    assert abs(lc - 0.5) < 0.05
    # and a policy that is genuinely better at equal length keeps its advantage
    wins2 = rng.random(n) < 1 / (1 + np.exp(-(1.0 + 2 * (lp - lb) / 40.0)))
    lc2 = length_controlled_win_rate(wins2.astype(float), base, lp, lb)
    assert abs(lc2 - 1 / (1 + math.exp(-1.0))) < 0.05


def test_lc_perfect_separation_and_degenerate_outcomes():
    # longer always wins, and lengths are symmetric around 0: the slope is large but
    # finite (ridge), and by symmetry the win rate at equal length is 1/2.
    pol = [1, 1, 0, 0]
    lp = [20, 30, 10, 0]
    lb = [10, 10, 20, 20]  # differences +10, +20, -10, -20
    fit = fit_length_controlled(pol, [0.5] * 4, lp, lb)
    assert math.isfinite(fit.slope) and fit.slope > 5
    assert fit.win_rate == pytest.approx(0.5, abs=1e-6)
    assert length_controlled_win_rate([1, 1], [0, 0], [5, 9], [3, 3]) == 1.0
    assert length_controlled_win_rate([0, 0], [1, 1], [5, 9], [3, 3]) == 0.0
