"""Programmatic rewards for the PPO tests (loaded as tests/algos/reward_fns.py:NAME)."""


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
