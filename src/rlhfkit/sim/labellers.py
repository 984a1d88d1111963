"""Simulated labellers: Bradley–Terry judges of the gold score, each with its own noise and bias.

In the spirit of AlpacaFarm's simulated annotators (Dubois et al. 2023): labeller j prefers response a over b with
probability σ((g_a − g_b + β_j·(len_a − len_b)/100) / τ_j), where g is the gold score, τ_j the noise temperature
(τ → 0: always the higher gold score) and β_j a length bias (people often prefer longer answers). Rankings of K
responses are drawn from the Plackett–Luce model of the same utilities (Gumbel-max over u/τ); responses whose
noisy utilities lie within `tie_margin` of the best of their group are reported as tied.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rlhfkit.sim.tasks import Task, gold_score


@dataclass(frozen=True)
class Labeller:
    id: str
    temperature: float = 0.1  # τ: Bradley–Terry noise on the gold-score scale
    length_bias: float = 0.0  # β: utility per 100 characters of length
    tie_margin: float = 0.0  # noisy utilities closer than this are a tie in rankings

    def utility(self, task: Task, response: str) -> float:
        return gold_score(task, response) + self.length_bias * len(response) / 100

    def p_prefers(self, task: Task, a: str, b: str) -> float:
        """P(a ≻ b) under this labeller."""
        d = self.utility(task, a) - self.utility(task, b)
        if self.temperature == 0:
            return 1.0 if d > 0 else 0.0 if d < 0 else 0.5
        return 1 / (1 + math.exp(-d / self.temperature))

    def compare(self, task: Task, a: str, b: str, rng: random.Random) -> int:
        """1 if a is preferred, 0 if b is."""
        return int(rng.random() < self.p_prefers(task, a, b))

    def rank(self, task: Task, responses: list[str], rng: random.Random) -> list[int | list[int]]:
        """Best-first ranking of indices into `responses`, ties as nested lists (the SPEC §3 rankings format)."""
        noisy = [(self.utility(task, r) + (self.temperature * _gumbel(rng) if self.temperature else 0.0), i)
                 for i, r in enumerate(responses)]
        noisy.sort(key=lambda t: -t[0])
        groups: list[list[int]] = [[noisy[0][1]]]
        top = noisy[0][0]  # utility of the current group's best: ties are measured from it, so they do not chain
        for u, i in noisy[1:]:
            if top - u <= self.tie_margin:
                groups[-1].append(i)
            else:
                groups.append([i])
                top = u
        return [g[0] if len(g) == 1 else sorted(g) for g in groups]


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(max(rng.random(), 1e-300)))


def default_pool() -> list[Labeller]:
    """Five labellers of varying care and a mild, varying taste for length."""
    return [Labeller("L1", 0.05, 0.0), Labeller("L2", 0.1, 0.02), Labeller("L3", 0.2, 0.05, 0.02),
            Labeller("L4", 0.15, -0.02), Labeller("L5", 0.3, 0.1, 0.05)]


GOLD = Labeller("gold", temperature=0.0)  # evaluation only: the gold score itself, never a training label
