"""Programmatic rewards for the PPO tests (loaded as tests/algos/reward_fns.py:NAME)."""

import json
import os
from pathlib import Path


def a_fraction(prompts, responses, metadata):
    """Fraction of a response's words that are "a": one common token to favour, a dense and learnable signal."""
    out = []
    for r in responses:
        words = r.split()
        out.append(sum(w.lower() == "a" for w in words) / len(words) if words else 0.0)
    return out


def vowel_fraction(prompts, responses, metadata):
    """Fraction of a response's characters that are vowels: varies from sample to sample even for a random model."""
    return [sum(c in "aeiouAEIOU" for c in r) / len(r) if r else 0.0 for r in responses]


def recorded_a_fraction(prompts, responses, metadata):
    """`a_fraction`, and each call's (prompt, response) rows appended to $RLHFKIT_TEST_RECORD/RANK.jsonl (one line
    per call; RANK: the process under torchrun), so a test can see which rows each process scored."""
    record = Path(os.environ["RLHFKIT_TEST_RECORD"])
    record.mkdir(parents=True, exist_ok=True)
    with (record / f"{os.environ.get('RANK', '0')}.jsonl").open("a") as f:
        f.write(json.dumps([[json.dumps(p), r] for p, r in zip(prompts, responses)]) + "\n")
    return a_fraction(prompts, responses, metadata)
