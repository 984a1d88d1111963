"""The human-feedback web app (SPEC §6): people write prompts and demonstrations, rank K sampled responses,
compare two responses per chat turn and give thumbs up/down; rlhfkit turns what they gave into training data.

- store.py:    the database (SQLAlchemy Core; SQLite with WAL by default): users, sessions, prompts, responses and
               one append-only table per kind of feedback, with a schema version and a list of migrations
- server.py:   the Starlette app (server-rendered pages and a JSON API that mirrors them) and `serve`
- pages.py:    the HTML templates, CSS and the little JavaScript the pages need
- export.py:   feedback -> SFT conversations, pairs or K-way rankings, split train/validation by labeller
- commands.py: the configs and entry points of `rlhfkit label serve | users add | export`

The web stack (starlette, uvicorn, sqlalchemy) is the `[web]` extra and is imported only from this package.
"""
