"""Evaluation: reward-model calibration (calibration.py), win rates, intervals and Monte-Carlo KL (winrates.py);
Elo is `rlhfkit.losses.elo_ratings`. The `rlhfkit eval` command and the reward–KL frontier come later."""
