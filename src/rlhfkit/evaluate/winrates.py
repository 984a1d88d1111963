"""Win rates with honest intervals, the win-rate matrix of several models, and Monte-Carlo KL to a reference.

Conventions (ALGORITHMS.md, Evaluation): a tie counts half a win; intervals are Wilson score intervals on the
half-counted win fraction, or percentile bootstrap over comparisons. Elo lives in core/losses.py (`elo_ratings`,
Bradley–Terry maximum likelihood, mean 1000).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from torch import Tensor

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean of outcomes 1 (A won), 0 (B won), 0.5 (tie)."""
    if not outcomes:
        raise ValueError("win_rate needs at least one comparison")
    return sum(outcomes) / len(outcomes)


def wilson_interval(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion wins/n (wins may be fractional: ties count half)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(outcomes: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling comparisons."""
    rng = random.Random(seed)
    n = len(outcomes)
    stats = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return stats[int(lo * (n_boot - 1))], stats[int(math.ceil(hi * (n_boot - 1)))]


def win_rate_matrix(games: Sequence[tuple[str, str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """matrix[a][b] = {"win_rate", "lo", "hi", "n", "ties"} of a against b over all games between them, either
    order."""
    by_pair: dict[tuple[str, str], list[float]] = {}
    for a, b, outcome in games:
        by_pair.setdefault((a, b), []).append(outcome)
        by_pair.setdefault((b, a), []).append(1 - outcome)
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    for (a, b), outs in by_pair.items():
        lo, hi = wilson_interval(sum(outs), len(outs))
        matrix.setdefault(a, {})[b] = {"win_rate": win_rate(outs), "lo": lo, "hi": hi, "n": len(outs),
                                       "ties": sum(o == 0.5 for o in outs)}
    return matrix


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Monte-Carlo KL(π ‖ π_ref) per sequence from the model's own samples: Σ_t (log π − log π_ref) over response
    tokens; (B, T) -> (B,). Its mean over samples is an unbiased estimate of the sequence-level KL."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)
