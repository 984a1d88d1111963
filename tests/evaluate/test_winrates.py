"""Win rates, intervals, the win-rate matrix and the Monte-Carlo KL estimator, against hand-worked values."""

from __future__ import annotations

import math

import pytest

from rlhfkit.core.losses import elo_ratings
from rlhfkit.evaluate import winrates


def test_ties_count_half():
    assert winrates.win_rate([1, 0, 0.5, 0.5]) == 0.5
    assert winrates.win_rate([1, 1, 0.5, 0]) == 0.625


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre = (0.5 + 1.96²/200)/(1 + 1.96²/100) = 0.5;
    # half = 1.96·sqrt(0.25/100 + 1.96²/40000)/(1 + 1.96²/100) = 1.96·0.05095/1.03842 ≈ 0.09617
    lo, hi = winrates.wilson_interval(50, 100)
    assert lo == pytest.approx(0.5 - 0.096170, abs=1e-5) and hi == pytest.approx(0.5 + 0.096170, abs=1e-5)
    # all wins: the interval stays inside [0, 1] and excludes 1/2 for n = 20: lo = 1/(1 + 1.96²/20) ≈ 0.8389
    lo, hi = winrates.wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 / (1 + winrates.Z95 ** 2 / 20), abs=1e-9)



def test_win_rate_matrix_is_antisymmetric():
    games = [("a", "b", 1), ("b", "a", 0), ("a", "b", 0.5), ("a", "c", 1)]
    m = winrates.win_rate_matrix(games)
    assert m["a"]["b"]["win_rate"] == pytest.approx(2.5 / 3) and m["b"]["a"]["win_rate"] == pytest.approx(0.5 / 3)
    assert m["a"]["b"]["n"] == 3 and m["c"]["a"]["win_rate"] == 0
    assert m["a"]["b"]["ties"] == m["b"]["a"]["ties"] == 1 and m["a"]["c"]["ties"] == 0
    assert (m["a"]["b"]["wins"], m["a"]["b"]["losses"]) == (2, 0)  # one of a's three games with b tied
    assert (m["b"]["a"]["wins"], m["b"]["a"]["losses"]) == (0, 2)


def test_elo_with_a_model_that_never_loses_stays_finite_and_ordered():
    games = [("a", "b", 1)] * 10 + [("b", "c", 1)] * 6 + [("c", "b", 1)] * 4 + [("a", "c", 1)] * 5
    ratings = elo_ratings(games)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["a"] > ratings["b"] > ratings["c"]
    assert sum(ratings.values()) / 3 == pytest.approx(1000)




def test_ranking_games_by_hand():
    """Responses 0, 1 by ppo and 2, 3 by sft, ranked 2 > (0 = 3) > 1: the pairs of different models are (0,2) lost,
    (0,3) tied, (1,2) lost, (1,3) lost; same-model pairs (0,1) and (2,3) play no game."""
    games = winrates.ranking_games(["ppo", "ppo", "sft", "sft"], [2, [0, 3], 1])
    assert games == [("ppo", "sft", 0.0), ("ppo", "sft", 0.5), ("ppo", "sft", 0.0), ("ppo", "sft", 0.0)]
    assert winrates.ranking_games(["a", "a"], [0, 1]) == []
    assert winrates.ranking_games(["a", "b", "c"], [[0, 1, 2]]) == [("a", "b", 0.5), ("a", "c", 0.5), ("b", "c", 0.5)]
