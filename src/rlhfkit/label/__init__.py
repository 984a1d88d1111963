"""The human-feedback web app (SPEC §6): people write prompts and demonstrations, rank K sampled responses,
compare two responses per chat turn and give thumbs up/down; rlhfkit turns what they gave into training data.

- server.py:   the Starlette app (server-rendered pages and a JSON API that mirrors them) and `serve`
- pages.py:    the HTML templates, CSS and the little JavaScript the pages need
- commands.py: the configs and entry points of `rlhfkit label serve | users add | users revoke | export`
The database (users, sessions, prompts, responses and one append-only table per kind of feedback) and the export
to training data live in rlhfkit/feedback/, which evaluation reads too.

The web stack (starlette, uvicorn, sqlalchemy) is the `[web]` extra and is imported only when a command needs it.
"""
