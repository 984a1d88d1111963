"""Calibration maths (rlhfkit.evaluate.calibration) on small examples worked out by hand."""

import math

import pytest
import torch

from rlhfkit.evaluate import calibration


def test_oriented_takes_the_higher_scored_response_as_a():
    """diff +1: the model prefers the chosen one, and it won; diff −1: it prefers the rejected one, which lost;
    diff 0: p = σ(0) = 0.5 and a tie counts half."""
    p, outcome = calibration.oriented(torch.tensor([1.0, -1.0, 0.0]))
    s1 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(p, torch.tensor([s1, s1, 0.5], dtype=torch.float64))
    torch.testing.assert_close(outcome, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))


# 10 equal-width bins on [0.5, 1], width 0.05:
#   bin 0 [0.50, 0.55): p 0.52, 0.54 -> mean 0.53, outcomes 1, 0 -> freq 0.5, |gap| 0.03, n 2
#   bin 1 [0.55, 0.60): p 0.58       -> freq 1,                    |gap| 0.42, n 1
#   bin 8 [0.90, 0.95): p 0.93       -> freq 1,                    |gap| 0.07, n 1
#   bin 9 [0.95, 1.00]: p 0.97       -> freq 1,                    |gap| 0.03, n 1
# ECE = (2·0.03 + 0.42 + 0.07 + 0.03) / 5 = 0.58 / 5 = 0.116
P = torch.tensor([0.52, 0.54, 0.58, 0.93, 0.97], dtype=torch.float64)
Y = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])


def test_ece_by_hand():
    assert calibration.ece(P, Y) == pytest.approx(0.116, abs=1e-12)


def test_reliability_bins_by_hand():
    bins = calibration.reliability_bins(P, Y)
    assert bins.count.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert bins.mean_p[0].item() == pytest.approx(0.53) and bins.freq[0].item() == 0.5
    assert torch.isnan(bins.freq[2])  # an empty bin has no frequency
    assert bins.edges[0].item() == 0.5 and bins.edges[-1].item() == 1.0


def test_a_certain_prediction_goes_in_the_last_bin_and_perfect_calibration_is_zero():
    assert calibration.reliability_bins(torch.tensor([1.0]), torch.tensor([1.0])).count[-1] == 1
    # 0.525 predicted for 40 pairs of which 21 won: freq 0.525 exactly
    p = torch.full((40,), 0.525, dtype=torch.float64)
    y = torch.tensor([1.0] * 21 + [0.0] * 19)
    assert calibration.ece(p, y) == pytest.approx(0.0, abs=1e-12)


def test_fit_temperature_by_hand():
    """Three comparisons right by 2, one wrong by 2: NLL(β) = ¾·softplus(−2β) + ¼·softplus(2β) is smallest
    where σ(2β) = ¾, i.e. 2β = ln 3, so T = 1/β = 2 / ln 3 ≈ 1.820."""
    t = calibration.fit_temperature(torch.tensor([2.0, 2.0, 2.0, -2.0]))
    assert t == pytest.approx(2 / math.log(3), rel=1e-6)


def test_fit_temperature_stays_bounded_when_every_comparison_is_right():
    assert calibration.fit_temperature(torch.tensor([1.0, 3.0])) == pytest.approx(0.05, rel=1e-4)


def test_plot_reliability_writes_a_png(tmp_path):
    path = calibration.plot_reliability(calibration.reliability_bins(P, Y), tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
