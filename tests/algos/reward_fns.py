"""Programmatic rewards for the PPO and best-of-n tests (loaded as tests/algos/reward_fns.py:NAME)."""


def vowel_fraction(prompts, responses, metadata):
    """Fraction of a response's letters that are vowels: varies across random samples, so it is learnable."""
    out = []
    for r in responses:
        letters = [c for c in r.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out
