"""The feedback database's tables (SQLAlchemy Core) and its migrations. What the records mean, and how they are
written and corrected: store.py."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), unique=True, nullable=False),
    sa.Column("token_hash", sa.String(64), unique=True, nullable=False),  # sha256 of the token, never the token
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.String(32), nullable=False),
    sa.Column("revoked", sa.String(32), nullable=True),  # when `label users revoke` cut them off; None: active
)
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),  # the session expires `--session-hours` after this
)
submissions = sa.Table(
    "submissions", metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # the client's UUID
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
)


def _record_table(name: str, *columns: sa.Column) -> sa.Table:
    """A feedback table: who, when, which submission, which record it corrects, then its own columns."""
    return sa.Table(
        name, metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.String(36), sa.ForeignKey("submissions.id"), unique=True, nullable=False),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("supersedes", sa.Integer, sa.ForeignKey(f"{name}.id"), unique=True, nullable=True),
        *columns,
    )


prompts = _record_table("prompts", sa.Column("text", sa.Text, nullable=False))
responses = sa.Table(
    "responses", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False, index=True),
    sa.Column("context", sa.JSON, nullable=False),  # the messages the model answered, ending with a user turn
    sa.Column("model", sa.String(300), nullable=False),
    sa.Column("model_revision", sa.String(100), nullable=False),
    sa.Column("settings", sa.JSON, nullable=False),  # temperature, top_p, max_new_tokens, seed
    sa.Column("text", sa.Text, nullable=False),  # exactly what the labeller is shown
    sa.Column("requested_by", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
)
batches = sa.Table(  # rank items a training run queued together (a round), and how many rankings it waits for
    "batches", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("wanted", sa.Integer, nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
)
rank_items = sa.Table(  # K responses to one prompt, shown to every labeller who ranks them (agreement stats)
    "rank_items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("response_ids", sa.JSON, nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
    sa.Column("batch_id", sa.Integer, sa.ForeignKey("batches.id"), nullable=True),  # None: made by the app itself
)
assignments = sa.Table(  # what each labeller has been shown by a queue, so queues hand out unseen items
    "assignments", metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("kind", sa.String(20), primary_key=True),
    sa.Column("item_id", sa.Integer, primary_key=True),
    sa.Column("created", sa.String(32), nullable=False),
)
demonstrations = _record_table(
    "demonstrations",
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),
)
rankings = _record_table(
    "rankings",
    sa.Column("item_id", sa.Integer, sa.ForeignKey("rank_items.id"), nullable=False, index=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("response_ids", sa.JSON, nullable=False),  # in the order shown
    sa.Column("ranking", sa.JSON, nullable=False),  # best first, indices into response_ids, ties as nested lists
    sa.Column("flags", sa.JSON, nullable=False),
)
comparisons = _record_table(
    "comparisons",
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("response_a", sa.Integer, sa.ForeignKey("responses.id"), nullable=False),
    sa.Column("response_b", sa.Integer, sa.ForeignKey("responses.id"), nullable=False),
    sa.Column("choice", sa.String(3), nullable=False),  # a | b | tie
    sa.Column("strength", sa.String(20), nullable=True),  # slightly better | better | much better; None for a tie
    sa.Column("context", sa.JSON, nullable=False),  # the conversation before this turn
)
ratings = _record_table(
    "ratings",
    sa.Column("response_id", sa.Integer, sa.ForeignKey("responses.id"), nullable=False, index=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("thumbs", sa.Integer, nullable=False),  # +1 up, -1 down
    sa.Column("comment", sa.Text, nullable=False),
)
sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

# kind (as the API names it) -> table; and which columns a correction must keep (it corrects the same item)
KINDS = {"prompt": prompts, "demonstration": demonstrations, "ranking": rankings, "comparison": comparisons,
         "rating": ratings}
SAME_TARGET = {"prompt": (), "demonstration": ("prompt_id",), "ranking": ("item_id",),
               "comparison": ("response_a", "response_b"), "rating": ("response_id",)}
STRENGTHS = ("slightly better", "better", "much better")
ROLES = ("system", "user", "assistant")  # as rlhfkit.data.formats, which would import torch
MAX_TEXT = 20_000


def _v1(conn: sa.Connection) -> None:
    metadata.create_all(conn)


def _v2(conn: sa.Connection) -> None:
    """users.revoked. _v1 creates today's tables, so a database made since has the column already; one made
    before gets it here, in place, NULL (active) for everyone."""
    if "revoked" not in {c["name"] for c in sa.inspect(conn).get_columns("users")}:
        conn.execute(sa.text("ALTER TABLE users ADD COLUMN revoked VARCHAR(32)"))


def _v3(conn: sa.Connection) -> None:
    """batches, and rank_items.batch_id (NULL for the items queued before: they belong to no batch)."""
    batches.create(conn, checkfirst=True)
    if "batch_id" not in {c["name"] for c in sa.inspect(conn).get_columns("rank_items")}:
        conn.execute(sa.text("ALTER TABLE rank_items ADD COLUMN batch_id INTEGER REFERENCES batches (id)"))


# Migration i brings the schema from version i to i + 1. Append, never edit: databases in use have run them.
MIGRATIONS = [_v1, _v2, _v3]
