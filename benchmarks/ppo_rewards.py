"""Programmatic rewards for the PPO benchmark runs (`--reward-fn benchmarks/ppo_rewards.py:NAME`)."""


def length_target(prompts, responses, metadata, target: int = 12):
    """Follow a length budget: 1 for exactly `target` words, falling linearly to −1 at 0 or 3·target words."""
    return [max(-1.0, 1.0 - abs(len(r.split()) - target) / target) for r in responses]
