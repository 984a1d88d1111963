"""SPEC §5's `rlhfkit.losses`: the fixed-contract tensor functions, defined in rlhfkit.core.losses."""

from rlhfkit.core.losses import dpo_loss, elo_ratings, gae, kl_penalized_rewards, pairwise_loss, ranking_loss

__all__ = ["dpo_loss", "pairwise_loss", "ranking_loss", "gae", "kl_penalized_rewards", "elo_ratings"]
