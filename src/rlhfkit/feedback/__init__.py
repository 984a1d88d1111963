"""Human feedback as data: the database the labelling app writes (store.py) and what rlhfkit reads from it:
training data (export.py: SFT conversations, pairs or K-way rankings, split train/validation by person) and the
A/B games of `rlhfkit eval --judge db:FILE` (`store.comparison_games`). SQLAlchemy is the `[web]` extra; this package
is imported only where a command asks for it.
"""
