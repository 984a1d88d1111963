"""Evaluation: reward-model calibration (win rates, Elo and the KL–reward frontier come later)."""
