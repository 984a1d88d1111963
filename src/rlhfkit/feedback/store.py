"""The feedback database: SQLAlchemy Core over SQLite (WAL, foreign keys, fsync on commit) or any SQLAlchemy URL.

Records are append-only. A correction is a new record whose `supersedes` names the record it replaces (at most
one correction per record, so corrections form a chain and the head is the record nobody supersedes). Every
feedback record carries its labeller, its time and the prompt; the responses it refers to carry the model name
and revision, the generation settings, the context the model saw and the exact text shown. Responses are never
edited either, so a record's references always show what the labeller saw.

Each submission carries a client-made UUID. It goes into `submissions` (primary key) in the same transaction as
the record, so a replayed submission fails as a whole and stores nothing; a submission is acknowledged only
after its transaction has committed.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from rlhfkit.feedback.schema import (KINDS, MAX_TEXT, MIGRATIONS, ROLES, SAME_TARGET, STRENGTHS, assignments,
                                     batches, demonstrations, prompts, rank_items, rankings, ratings, responses,
                                     sessions, submissions, users)


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status the server answers with."""

    status = 400


class Invalid(StoreError):
    status = 422


class NotFound(StoreError):
    status = 404


class Forbidden(StoreError):
    status = 403


class Conflict(StoreError):
    status = 409


@dataclass(frozen=True)
class User:
    id: int
    name: str
    is_admin: bool


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def db_url(db: str) -> str:
    """`--db`: a SQLAlchemy URL, or a path to an SQLite file."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the submission is acknowledged
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def open_engine(db: str, create: bool = True, option: str = "--db ") -> sa.Engine:
    """Connect (creating an SQLite file if needed and `create`) and bring the schema up to date. A database that
    cannot be opened, or an SQLite file that is missing when not `create`, is a StoreError naming `option` (the
    command-line option that gave `db`, written before it)."""
    url = db_url(db)
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise NotFound(f"{option}{db}: no such database (it is made by `rlhfkit label serve` or "
                           "`label users add`)")
        engine = sa.create_engine(url, connect_args={"check_same_thread": False}, poolclass=sa.pool.QueuePool)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        engine.dispose()
        raise StoreError(f"{option}{db}: cannot open the database ({e.orig})") from None
    return engine


def migrate(engine: sa.Engine) -> int:
    """Run the migrations this database has not run yet; returns the schema version."""
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table("schema_version"):
            conn.execute(sa.text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (0)"))
        version = conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one()
        for step in MIGRATIONS[version:]:
            step(conn)
        conn.execute(sa.text("UPDATE schema_version SET version = :v"), {"v": len(MIGRATIONS)})
    return len(MIGRATIONS)


# --- users and sessions -----------------------------------------------------------------------------------

def add_user(engine: sa.Engine, name: str, admin: bool = False) -> str:
    """Create a user and return their sign-in token (shown once; only its hash is stored). A revoked user is
    reinstated under a new token: same user, same records, and the old token stays dead."""
    name = name.strip()
    if not name or len(name) > 100:
        raise Invalid("a user name must have 1 to 100 characters")
    token = secrets.token_urlsafe(24)
    with engine.begin() as conn:
        row = conn.execute(sa.select(users.c.id, users.c.revoked).where(users.c.name == name)).first()
        if row is not None and row.revoked is None:
            raise Conflict(f"user {name!r} exists already")
        values = {"token_hash": token_hash(token), "is_admin": admin}
        if row is None:
            conn.execute(users.insert().values(name=name, created=now(), **values))
        else:
            conn.execute(users.update().where(users.c.id == row.id).values(revoked=None, **values))
    return token


def revoked_at(engine: sa.Engine, name: str) -> str | None:
    """When user `name` was revoked; None for an active or unknown user."""
    with engine.connect() as conn:
        return conn.execute(sa.select(users.c.revoked).where(users.c.name == name.strip())).scalar()


def revoke_user(engine: sa.Engine, name: str) -> int:
    """Cut `name` off at once: their token stops working and their sessions are deleted, so their next request
    gets 401. Their records stay (exports and agreement keep them). Returns how many open sessions ended."""
    with engine.begin() as conn:
        row = conn.execute(sa.select(users.c.id, users.c.revoked).where(users.c.name == name.strip())).first()
        if row is None:
            raise NotFound(f"no user named {name.strip()!r}")
        conn.execute(users.update().where(users.c.id == row.id).values(revoked=row.revoked or now()))
        return conn.execute(sessions.delete().where(sessions.c.user_id == row.id)).rowcount


# Tokens and session cookies are looked up by their SHA-256, never compared in Python: what a lookup's timing could
# reveal is how much of a hash matched, and choosing a hash prefix means inverting SHA-256.

def user_by_token(engine: sa.Engine, token: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.token_hash == token_hash(token),
                                                  users.c.revoked.is_(None))).first()
    return User(row.id, row.name, row.is_admin) if row else None


def _cutoff(lifetime: timedelta) -> str:
    """The `created` of sessions that expire now: ISO strings of one format in UTC compare as the times do."""
    return (datetime.now(timezone.utc) - lifetime).isoformat(timespec="microseconds")


def new_session(engine: sa.Engine, user: User, lifetime: timedelta) -> tuple[str, str]:
    """A session cookie value and its CSRF token. Sessions older than `lifetime` are deleted on the way, so a
    server that runs for weeks keeps only the live ones."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(sessions.delete().where(sessions.c.created <= _cutoff(lifetime)))
        conn.execute(sessions.insert().values(token_hash=token_hash(cookie), user_id=user.id, csrf=csrf,
                                              created=now()))
    return cookie, csrf


def session_user(engine: sa.Engine, cookie: str, lifetime: timedelta) -> tuple[User, str] | None:
    """The user of a session made less than `lifetime` ago, and its CSRF token; None for an expired or unknown
    session, or a revoked user."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(users, sessions.c.csrf).join(sessions, sessions.c.user_id == users.c.id)
                           .where(sessions.c.token_hash == token_hash(cookie), sessions.c.created > _cutoff(lifetime),
                                  users.c.revoked.is_(None))).first()
    return (User(row.id, row.name, row.is_admin), row.csrf) if row else None


def end_session(engine: sa.Engine, cookie: str) -> None:
    with engine.begin() as conn:
        conn.execute(sessions.delete().where(sessions.c.token_hash == token_hash(cookie)))


# --- feedback records -------------------------------------------------------------------------------------

def _text(value, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value.strip() and not allow_empty):
        raise Invalid(f"{what} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise Invalid(f"{what} is longer than {MAX_TEXT} characters")
    return value


def _row(conn: sa.Connection, table: sa.Table, item_id, what: str):
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise Invalid(f"{what} must be an integer id")
    row = conn.execute(sa.select(table).where(table.c.id == item_id)).first()
    if row is None:
        raise NotFound(f"no {what} {item_id}")
    return row


def submit(engine: sa.Engine, user: User, kind: str, body: dict) -> int:
    """Validate and store one submission of `kind` atomically; returns the new record's id.

    body: `submission_id` (UUID), optional `supersedes` (the id of the labeller's own record it corrects) and the
    kind's own fields (see `_VALUES`). Raises Invalid, NotFound, Forbidden or Conflict, storing nothing.
    """
    table = KINDS[kind]
    try:
        sub_id = str(uuid.UUID(str(body.get("submission_id"))))
    except ValueError:
        raise Invalid("submission_id must be a UUID") from None
    with engine.begin() as conn:
        if conn.execute(sa.select(submissions.c.id).where(submissions.c.id == sub_id)).first():
            raise Conflict(f"submission {sub_id} was stored already")
        values = _VALUES[kind](conn, user, body)
        old_id = body.get("supersedes")
        if old_id is not None:
            old = _row(conn, table, old_id, kind)
            if old.labeller_id != user.id:
                raise Forbidden(f"{kind} {old_id} is not yours to correct")
            if conn.execute(sa.select(table.c.id).where(table.c.supersedes == old_id)).first():
                raise Conflict(f"{kind} {old_id} has been corrected already; correct the latest version")
            if any(getattr(old, c) != values[c] for c in SAME_TARGET[kind]):
                raise Invalid(f"a correction must be about the same item as {kind} {old_id}")
        created = now()
        conn.execute(submissions.insert().values(id=sub_id, kind=kind, user_id=user.id, created=created))
        return conn.execute(table.insert().values(submission_id=sub_id, labeller_id=user.id, created=created,
                                                  supersedes=old_id, **values)).inserted_primary_key[0]


def _prompt_values(conn, user, body) -> dict:
    return {"text": _text(body.get("text"), "text")}


def _demonstration_values(conn, user, body) -> dict:
    prompt = _row(conn, prompts, body.get("prompt_id"), "prompt")
    return {"prompt_id": prompt.id, "text": _text(body.get("text"), "text")}


def check_ranking(ranking, k: int) -> list:
    """A best-first ranking of k items: every index 0..k-1 once, ties as nested lists (SPEC §3)."""
    if not isinstance(ranking, list) or not ranking:
        raise Invalid("ranking must be a non-empty list")
    flat = []
    for item in ranking:
        group = item if isinstance(item, list) else [item]
        if not group or not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
            raise Invalid("ranking items must be indices or non-empty lists of tied indices")
        flat += group
    if sorted(flat) != list(range(k)):
        raise Invalid(f"ranking must name each of the {k} responses exactly once")
    return ranking


def _ranking_values(conn, user, body) -> dict:
    item = _row(conn, rank_items, body.get("item_id"), "rank item")
    flags = body.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) and len(f) <= 100 for f in flags):
        raise Invalid("flags must be a list of short strings")
    return {"item_id": item.id, "prompt_id": item.prompt_id, "response_ids": item.response_ids,
            "ranking": check_ranking(body.get("ranking"), len(item.response_ids)), "flags": flags}


def _comparison_values(conn, user, body) -> dict:
    a = _row(conn, responses, body.get("response_a"), "response")
    b = _row(conn, responses, body.get("response_b"), "response")
    if a.id == b.id or a.prompt_id != b.prompt_id or a.context != b.context:
        raise Invalid("response_a and response_b must be two different answers to the same conversation")
    choice, strength = body.get("choice"), body.get("strength")
    if choice not in ("a", "b", "tie"):
        raise Invalid("choice must be 'a', 'b' or 'tie'")
    if choice == "tie":
        strength = None
    elif strength not in STRENGTHS:
        raise Invalid(f"strength must be one of {', '.join(STRENGTHS)}")
    return {"prompt_id": a.prompt_id, "response_a": a.id, "response_b": b.id, "choice": choice,
            "strength": strength, "context": a.context}


def _rating_values(conn, user, body) -> dict:
    response = _row(conn, responses, body.get("response_id"), "response")
    thumbs = {"up": 1, "down": -1}.get(body.get("thumbs"))
    if thumbs is None:
        raise Invalid("thumbs must be 'up' or 'down'")
    return {"response_id": response.id, "prompt_id": response.prompt_id, "thumbs": thumbs,
            "comment": _text(body.get("comment", ""), "comment", allow_empty=True)}


_VALUES = {"prompt": _prompt_values, "demonstration": _demonstration_values, "ranking": _ranking_values,
           "comparison": _comparison_values, "rating": _rating_values}


def check_messages(messages) -> list[dict]:
    """A conversation for the model: role/content messages ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES:
            raise Invalid("each message must be {\"role\": system|user|assistant, \"content\": text}")
        _text(m["content"], "message content")
    if messages[-1]["role"] != "user":
        raise Invalid("the conversation must end with a user turn")
    return messages


def add_responses(engine: sa.Engine, user: User, prompt_id: int, context: list[dict],
                  generated: list[tuple[str, str, dict, str]]) -> list[int]:
    """Store generated responses: (model, revision, settings, text) each; returns their ids."""
    with engine.begin() as conn:
        _row(conn, prompts, prompt_id, "prompt")
        return [conn.execute(responses.insert().values(
            prompt_id=prompt_id, context=context, model=model, model_revision=rev, settings=settings, text=text,
            requested_by=user.id, created=now())).inserted_primary_key[0]
            for model, rev, settings, text in generated]


def add_rank_item(engine: sa.Engine, prompt_id: int, response_ids: list[int], batch_id: int | None = None) -> int:
    with engine.begin() as conn:
        return conn.execute(rank_items.insert().values(prompt_id=prompt_id, response_ids=response_ids,
                                                       created=now(), batch_id=batch_id)).inserted_primary_key[0]


def add_batch(engine: sa.Engine, name: str, wanted: int) -> int:
    """A batch of rank items a training run queues together (`name`: the run's round), waiting for `wanted`
    rankings."""
    with engine.begin() as conn:
        return conn.execute(batches.insert().values(name=name, wanted=wanted, created=now())).inserted_primary_key[0]


def set_wanted(engine: sa.Engine, batch_id: int, wanted: int) -> None:
    with engine.begin() as conn:
        conn.execute(batches.update().where(batches.c.id == batch_id).values(wanted=wanted))


def get(engine: sa.Engine, table: sa.Table, item_id: int, what: str) -> dict:
    with engine.connect() as conn:
        return dict(_row(conn, table, item_id, what)._mapping)


def heads(table: sa.Table):
    """SELECT of the records that no correction supersedes."""
    newer = sa.select(table.c.supersedes).where(table.c.supersedes.is_not(None))
    return sa.select(table).where(table.c.id.not_in(newer))


# --- queues -----------------------------------------------------------------------------------------------

def next_item(engine: sa.Engine, user: User, kind: str) -> int | None:
    """The item of `kind` (demonstration: a prompt; ranking: a rank item; rating: a response) for `user`: the one
    they were handed last and have not labelled yet, else the least-labelled one they have never been handed."""
    table, labels, key = {"demonstration": (prompts, demonstrations, "prompt_id"),
                          "ranking": (rank_items, rankings, "item_id"),
                          "rating": (responses, ratings, "response_id")}[kind]
    mine = sa.select(labels.c[key]).where(labels.c.labeller_id == user.id)
    handed = sa.select(assignments.c.item_id).where(assignments.c.user_id == user.id, assignments.c.kind == kind)
    with engine.begin() as conn:
        open_item = conn.execute(handed.where(assignments.c.item_id.not_in(mine))
                                 .order_by(assignments.c.created.desc()).limit(1)).scalar()
        if open_item is not None:
            return open_item
        candidates = sa.select(table.c.id).where(table.c.id.not_in(handed), table.c.id.not_in(mine))
        if table is prompts:  # corrected prompts are shown in their latest version only
            candidates = candidates.where(table.c.id.not_in(
                sa.select(prompts.c.supersedes).where(prompts.c.supersedes.is_not(None))))
        count = sa.select(sa.func.count()).where(labels.c[key] == table.c.id).scalar_subquery()
        item = conn.execute(candidates.order_by(count, table.c.id).limit(1)).scalar()
        if item is not None:
            conn.execute(assignments.insert().values(user_id=user.id, kind=kind, item_id=item, created=now()))
        return item


def hand_out(engine: sa.Engine, user: User, kind: str, item_id: int) -> None:
    """Record that `item_id` (just made for this user) has been handed to them."""
    with engine.begin() as conn:
        conn.execute(assignments.insert().values(user_id=user.id, kind=kind, item_id=item_id, created=now()))


def unranked_prompt(engine: sa.Engine) -> int | None:
    """A prompt that has no rank item yet (the newest first), to make the next rank item from."""
    with engine.connect() as conn:
        superseded = sa.select(prompts.c.supersedes).where(prompts.c.supersedes.is_not(None))
        return conn.execute(sa.select(prompts.c.id).where(prompts.c.id.not_in(sa.select(rank_items.c.prompt_id)),
                                                          prompts.c.id.not_in(superseded))
                            .order_by(prompts.c.id.desc()).limit(1)).scalar()


def latest_prompt(engine: sa.Engine) -> int | None:
    """The prompt with the fewest responses (the newest first among those), to sample a response to rate."""
    with engine.connect() as conn:
        superseded = sa.select(prompts.c.supersedes).where(prompts.c.supersedes.is_not(None))
        count = sa.select(sa.func.count()).where(responses.c.prompt_id == prompts.c.id).scalar_subquery()
        return conn.execute(sa.select(prompts.c.id).where(prompts.c.id.not_in(superseded))
                            .order_by(count, prompts.c.id.desc()).limit(1)).scalar()
