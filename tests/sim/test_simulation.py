"""The built-in task suite and simulated labellers: gold scores, splits, labeller statistics."""

from __future__ import annotations

import math
import random

import pytest

from rlhfkit.sim import labellers, tasks
from rlhfkit.sim.labellers import Labeller


def test_suite_is_deterministic_distinct_and_has_every_family():
    a, b = tasks.build_suite(400, seed=3), tasks.build_suite(400, seed=3)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert len({t.prompt for t in a}) == len(a) == 400
    assert {t.family for t in a} == set(tasks.FAMILIES)
    assert 0.1 < sum(t.harmful for t in a) / len(a) < 0.3


def test_splits_are_disjoint_and_cover_the_suite():
    suite = tasks.build_suite(1000)
    by_split = {s: {t.prompt for t in suite if tasks.split_of(t) == s} for s in tasks.SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(suite)
    names = list(by_split)
    assert all(not (by_split[x] & by_split[y]) for i, x in enumerate(names) for y in names[i + 1:])
    assert all(len(v) > 50 for v in by_split.values())


@pytest.mark.parametrize("family,params,good,bad", [
    ("length", {"n": 5}, "one two three four five", "one two three four five six seven eight nine ten"),
    ("list", {"k": 3, "category": "fruits"}, "1. apple\n2. pear\n3. plum", "apple pear plum are nice"),
    ("fact", {"answer": "Paris"}, "The capital is Paris.", "The capital is Lyon."),
    ("sentiment", {"mood": "negative"}, "A gloomy and dreary day.", "A lovely and bright day."),
    ("harmful", {"act": "x"}, "Sorry, I can't help with that. You could ask them instead.", "Sure, here is how."),
])
def test_gold_prefers_the_right_answer(family, params, good, bad):
    task = tasks.Task(family, "prompt", params)
    assert tasks.gold_score(task, good) > tasks.gold_score(task, bad)


def test_gold_scores_by_hand():
    # length: 1 − |words − n|/n: 10 words for n = 5 -> 1 − 5/5 = 0
    assert tasks.gold_score(tasks.Task("length", "p", {"n": 5}), " ".join(["w"] * 10)) == 0.0
    # list: 2 of 3 valid items on 3 lines -> 2/3 − 0
    assert tasks.gold_score(tasks.Task("list", "p", {"k": 3, "category": "fruits"}), "apple\npear\nrock") == \
        pytest.approx(2 / 3)
    # harmful: a refusal without an alternative 0.6, with one 1.0, compliance −1
    harm = tasks.Task("harmful", "p", {})
    assert tasks.gold_score(harm, "Sorry, no.") == 0.6 and tasks.gold_score(harm, "Do it like this.") == -1.0
    # refusing a harmless request is unhelpful
    assert tasks.gold_score(tasks.Task("fact", "p", {"answer": "Rome"}), "Sorry, I can't answer.") == -0.5


def test_demonstrations_score_well():
    rng = random.Random(0)
    suite = tasks.build_suite(300)
    scores = [tasks.gold_score(t, tasks.demonstration(t, rng)) for t in suite]
    assert min(scores) >= 0.6 and sum(scores) / len(scores) > 0.9


def test_noiseless_labeller_always_prefers_the_higher_gold_score():
    judge = Labeller("exact", temperature=0.0)
    task = tasks.Task("fact", "p", {"answer": "Oslo"})
    rng = random.Random(0)
    assert all(judge.compare(task, "It is Oslo.", "It is Bergen.", rng) == 1 for _ in range(200))
    assert all(judge.compare(task, "It is Bergen.", "It is Oslo.", rng) == 0 for _ in range(200))


def test_noise_makes_agreement_fall_as_gold_differences_shrink():
    judge = Labeller("noisy", temperature=0.3)
    task = tasks.Task("length", "p", {"n": 10})
    best = " ".join(["w"] * 10)  # gold 1.0
    rng = random.Random(1)

    def agreement(other_words: int) -> float:
        other = " ".join(["w"] * other_words)
        return sum(judge.compare(task, best, other, rng) for _ in range(4000)) / 4000

    far, near = agreement(2), agreement(9)  # gold differences 0.8 and 0.1
    assert far == pytest.approx(1 / (1 + math.exp(-0.8 / 0.3)), abs=0.03)  # σ(Δg/τ)
    assert near == pytest.approx(1 / (1 + math.exp(-0.1 / 0.3)), abs=0.03)
    assert far > near > 0.5


def test_rankings_are_valid_and_a_careful_labeller_ranks_by_gold():
    task = tasks.Task("length", "p", {"n": 4})
    responses = [" ".join(["w"] * k) for k in (4, 1, 6, 3)]  # gold 1, 0.25, 0.5, 0.75
    ranking = Labeller("exact", temperature=0.0).rank(task, responses, random.Random(0))
    assert ranking == [0, 3, 2, 1]
    tied = Labeller("coarse", temperature=0.0, tie_margin=0.3).rank(task, responses, random.Random(0))
    assert tied == [[0, 3], [1, 2]]  # 1 vs 0.75 and 0.5 vs 0.25 are within the margin
    for lab in labellers.default_pool():
        r = lab.rank(task, responses, random.Random(2))
        flat = [i for g in r for i in (g if isinstance(g, list) else [g])]
        assert sorted(flat) == [0, 1, 2, 3]


def test_gold_reward_reads_the_task_from_prompt_rows():
    suite = tasks.build_suite(50, seed=3)
    rows = [tasks.to_row(t) for t in suite]
    responses = [tasks.demonstration(t, random.Random(i)) for i, t in enumerate(suite)]
    got = tasks.gold_reward([[{"role": "user", "content": t.prompt}] for t in suite], responses, rows)
    assert got == [tasks.gold_score(t, r) for t, r in zip(suite, responses)]
    with pytest.raises(ValueError, match="response 0: its prompt row has no built-in task"):
        tasks.gold_reward([[]], ["hi"], [{"prompt": "hi"}])
