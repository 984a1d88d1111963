"""Calibration of a preference model, as the HH paper (Bai et al. 2022, §4, Fig. 9) checked its PMs.

A reward model predicts P(A ≻ B) = σ(r_A − r_B). On held-out comparisons we orient every pair so that A is
the response the model scores higher: p = σ(|r_A − r_B|) ∈ [0.5, 1], and the outcome is 1 when A is the one
people preferred (0.5 for an exact score tie). Binning p into equal-width bins on [0.5, 1] and plotting the
observed frequency against the mean prediction gives the reliability diagram; the expected calibration error
is ECE = Σ_b (n_b / N) · |freq_b − mean_p_b|. Orienting by the model (rather than by the label, which would
make every outcome 1) is what makes the diagram informative; it equals counting every pair both ways.

Pure functions on tensors: no model, no I/O (the PNG is drawn by `plot_reliability`, which imports
matplotlib only when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def oriented(diffs: Tensor) -> tuple[Tensor, Tensor]:
    """diffs [P] = r_chosen − r_rejected -> (p [P] = σ(|diff|), outcome [P]: 1, 0 or 0.5 for a tie)."""
    diffs = diffs.double()
    outcome = (diffs > 0).double() + 0.5 * (diffs == 0).double()
    return torch.sigmoid(diffs.abs()), outcome


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins on [lo, hi]; empty bins have count 0 and NaN means. All tensors [n_bins]."""

    edges: Tensor  # [n_bins + 1]
    count: Tensor
    mean_p: Tensor
    freq: Tensor


def reliability_bins(p: Tensor, outcome: Tensor, n_bins: int = 10, lo: float = 0.5, hi: float = 1.0
                     ) -> ReliabilityBins:
    """Bin predictions p [P] (equal width on [lo, hi], the last bin closed) with their outcomes [P]."""
    p, outcome = p.double(), outcome.double()
    edges = torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)
    index = ((p - lo) / (hi - lo) * n_bins).floor().long().clamp(0, n_bins - 1)  # p = hi goes in the last bin
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(p))
    sum_p = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, p)
    sum_y = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, outcome)
    return ReliabilityBins(edges, count, sum_p / count, sum_y / count)


def ece(p: Tensor, outcome: Tensor, n_bins: int = 10, lo: float = 0.5, hi: float = 1.0) -> float:
    """Expected calibration error Σ_b (n_b/N)·|freq_b − mean_p_b| over non-empty equal-width bins."""
    bins = reliability_bins(p, outcome, n_bins, lo, hi)
    used = bins.count > 0
    gap = (bins.freq[used] - bins.mean_p[used]).abs()
    return float((bins.count[used] * gap).sum() / bins.count.sum())


def fit_temperature(diffs: Tensor, lo: float = 0.05, hi: float = 20.0, iters: int = 100) -> float:
    """Temperature T minimising mean −log σ(diff / T) over comparisons diffs [P] = r_chosen − r_rejected.

    The loss is convex in β = 1/T, so a golden-section search over β ∈ [1/hi, 1/lo] finds the minimum; the
    bounds keep T finite when every comparison is right (the unbounded optimum is then T → 0).
    """
    diffs = diffs.double()
    nll = lambda beta: float(F.softplus(-beta * diffs).mean())  # noqa: E731  −log σ(x) = softplus(−x)
    a, b = 1.0 / hi, 1.0 / lo
    g = (5 ** 0.5 - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(iters):
        if nll(c) < nll(d):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return 2.0 / (a + b)


def plot_reliability(bins: ReliabilityBins, path: str | Path, title: str = "reward model calibration") -> Path:
    """Reliability diagram PNG: observed frequency against mean prediction per bin, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = bins.count > 0
    centers = ((bins.edges[:-1] + bins.edges[1:]) / 2)[used]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lo, hi = float(bins.edges[0]), float(bins.edges[-1])
    ax.plot([lo, hi], [lo, hi], "--", color="grey", label="perfect calibration")
    ax.bar(centers.tolist(), bins.freq[used].tolist(), width=(hi - lo) / len(bins.count), alpha=0.3,
           edgecolor="black", label="observed")
    ax.plot(bins.mean_p[used].tolist(), bins.freq[used].tolist(), "o-", label="mean prediction")
    for x, y, n in zip(centers.tolist(), bins.freq[used].tolist(), bins.count[used].tolist()):
        ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.set(xlim=(lo, hi), ylim=(0, 1.02), xlabel="predicted P(higher-scored response preferred)",
           ylabel="observed frequency", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
