"""Human feedback as data: the database the labelling app writes (schema.py: its tables; store.py: records, users
and queues) and what rlhfkit reads from it: training data (export.py: SFT conversations, pairs or K-way rankings,
split train/validation by person), progress and agreement, and the A/B games of `rlhfkit eval --judge db:FILE`
(progress.py). SQLAlchemy is the `[web]` extra; this package is imported only where a command asks for it.
"""
