"""Win rates with honest intervals and the win-rate matrix of several models.

Conventions (ALGORITHMS.md, Evaluation): a tie counts half a win; intervals are Wilson score intervals on the
half-counted win fraction. Elo lives in core/losses.py (`elo_ratings`,
Bradley–Terry maximum likelihood, mean 1000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def win_rate_matrix(games: Sequence[tuple[str, str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """matrix[a][b] = {"win_rate", "lo", "hi", "n", "wins", "losses", "ties"} of a against b over all games between
    them, either order (wins, losses and ties count games)."""
    by_pair: dict[tuple[str, str], list[float]] = {}
    for a, b, outcome in games:
        by_pair.setdefault((a, b), []).append(outcome)
        by_pair.setdefault((b, a), []).append(1 - outcome)
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    for (a, b), outs in by_pair.items():
        lo, hi = wilson_interval(sum(outs), len(outs))
        matrix.setdefault(a, {})[b] = {"win_rate": win_rate(outs), "lo": lo, "hi": hi, "n": len(outs),
                                       "wins": sum(o == 1 for o in outs), "losses": sum(o == 0 for o in outs),
                                       "ties": sum(o == 0.5 for o in outs)}
    return matrix




def ranking_games(models: Sequence[str], ranking: Sequence) -> list[tuple[str, str, float]]:
    """The games one K-way ranking plays between the models that wrote its responses: every pair of responses by
    two different models, (model_a, model_b, outcome) with a the earlier response, outcome 1 if a ranked above b,
    0 if below, 0.5 if tied. models[i] wrote response i; ranking is best first, indices into the responses, ties as
    nested lists (SPEC's rankings rows)."""
    place = {i: rank for rank, group in enumerate(ranking) for i in (group if isinstance(group, list) else [group])}
    return [(models[i], models[j], 1.0 if place[i] < place[j] else 0.0 if place[i] > place[j] else 0.5)
            for i in range(len(models)) for j in range(i + 1, len(models)) if models[i] != models[j]]
