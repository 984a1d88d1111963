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
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), unique=True, nullable=False),
    sa.Column("token_hash", sa.String(64), unique=True, nullable=False),  # sha256 of the token, never the token
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created", sa.String(32), nullable=False),
)
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
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
rank_items = sa.Table(  # K responses to one prompt, shown to every labeller who ranks them (agreement stats)
    "rank_items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt_id", sa.Integer, sa.ForeignKey("prompts.id"), nullable=False),
    sa.Column("response_ids", sa.JSON, nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
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


# Migration i brings the schema from version i to i + 1. Append, never edit: databases in use have run them.
MIGRATIONS = [_v1]


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


def open_engine(db: str, create: bool = True) -> sa.Engine:
    """Connect (creating an SQLite file if needed and `create`) and bring the schema up to date. A database that
    cannot be opened, or an SQLite file that is missing when not `create`, is a StoreError naming --db."""
    url = db_url(db)
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise NotFound(f"--db {db}: no such database (it is made by `rlhfkit label serve` or `label users add`)")
        engine = sa.create_engine(url, connect_args={"check_same_thread": False}, poolclass=sa.pool.QueuePool)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        engine.dispose()
        raise StoreError(f"--db {db}: cannot open the database ({e.orig})") from None
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
    """Create a user and return their sign-in token (shown once; only its hash is stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise Invalid("a user name must have 1 to 100 characters")
    token = secrets.token_urlsafe(24)
    with engine.begin() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
            raise Conflict(f"user {name!r} exists already")
        conn.execute(users.insert().values(name=name, token_hash=token_hash(token), is_admin=admin, created=now()))
    return token


def user_by_token(engine: sa.Engine, token: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.token_hash == token_hash(token))).first()
    return User(row.id, row.name, row.is_admin) if row else None


def new_session(engine: sa.Engine, user: User) -> tuple[str, str]:
    """A session cookie value and its CSRF token."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(sessions.insert().values(token_hash=token_hash(cookie), user_id=user.id, csrf=csrf,
                                              created=now()))
    return cookie, csrf


def session_user(engine: sa.Engine, cookie: str) -> tuple[User, str] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(users, sessions.c.csrf).join(sessions, sessions.c.user_id == users.c.id)
                           .where(sessions.c.token_hash == token_hash(cookie))).first()
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


def add_rank_item(engine: sa.Engine, prompt_id: int, response_ids: list[int]) -> int:
    with engine.begin() as conn:
        return conn.execute(rank_items.insert().values(prompt_id=prompt_id, response_ids=response_ids,
                                                       created=now())).inserted_primary_key[0]


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


# --- reading back -----------------------------------------------------------------------------------------

def history(engine: sa.Engine, user: User, limit: int = 200) -> dict[str, list[dict]]:
    """The user's own records of each kind, newest first."""
    with engine.connect() as conn:
        return {kind: [dict(r._mapping) for r in conn.execute(
            sa.select(t).where(t.c.labeller_id == user.id).order_by(t.c.id.desc()).limit(limit))]
            for kind, t in KINDS.items()}


def stats(engine: sa.Engine) -> dict:
    """Progress (records per kind and labeller) and agreement between labellers on the same items."""
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(users.c.id, users.c.name)).all())
        per_kind = {}
        for kind, t in KINDS.items():
            rows = conn.execute(heads(t).with_only_columns(t.c.labeller_id, sa.func.count())
                                .group_by(t.c.labeller_id)).all()
            per_kind[kind] = {names[uid]: n for uid, n in rows}
        ranked = conn.execute(heads(rankings).with_only_columns(rankings.c.item_id, rankings.c.labeller_id,
                                                                rankings.c.ranking)).all()
        compared = conn.execute(heads(comparisons).with_only_columns(
            comparisons.c.response_a, comparisons.c.response_b, comparisons.c.labeller_id, comparisons.c.choice)).all()
    return {"records": per_kind, "ranking_agreement": ranking_agreement(ranked),
            "comparison_agreement": comparison_agreement(compared)}


def _order(ranking: list) -> dict[int, int]:
    return {i: place for place, item in enumerate(ranking) for i in (item if isinstance(item, list) else [item])}


def ranking_agreement(rows) -> dict:
    """Over pairs of labellers who ranked the same item: the fraction of response pairs that both ordered
    strictly and in the same direction (InstructGPT reports ~73% between its labellers)."""
    by_item: dict[int, list] = {}
    for item_id, labeller, ranking in rows:
        by_item.setdefault(item_id, []).append((labeller, _order(ranking)))
    agree = total = 0
    for entries in by_item.values():
        for x in range(len(entries)):
            for y in range(x + 1, len(entries)):
                (la, a), (lb, b) = entries[x], entries[y]
                if la == lb:
                    continue
                for i in a:
                    for j in a:
                        if i < j and a[i] != a[j] and b[i] != b[j]:
                            total += 1
                            agree += (a[i] < a[j]) == (b[i] < b[j])
    return {"pairs": total, "agreement": agree / total if total else None}


def comparison_agreement(rows) -> dict:
    """Over pairs of labellers who compared the same two responses: how often they made the same choice."""
    by_pair: dict[tuple, list] = {}
    for a, b, labeller, choice in rows:
        flipped = {"a": "b", "b": "a"}.get(choice, choice) if a > b else choice
        by_pair.setdefault((min(a, b), max(a, b)), []).append((labeller, flipped))
    pairs = [(x, y) for entries in by_pair.values() for i, x in enumerate(entries) for y in entries[i + 1:]
             if x[0] != y[0]]
    agree = sum(x[1] == y[1] for x, y in pairs)
    return {"pairs": len(pairs), "agreement": agree / len(pairs) if pairs else None}


def comparison_games(db_url: str) -> list[tuple[str, str, float]]:
    """One (model_a, model_b, outcome) per A/B comparison (latest versions) between responses of two different
    models: outcome 1 if a's response won, 0 if b's, 0.5 for a tie; the games `elo_ratings` takes."""
    engine = open_engine(db_url, create=False)
    ra, rb = responses.alias("ra"), responses.alias("rb")
    h = heads(comparisons).subquery()
    query = (sa.select(ra.c.model, rb.c.model, h.c.choice)
             .join(ra, ra.c.id == h.c.response_a).join(rb, rb.c.id == h.c.response_b)
             .where(ra.c.model != rb.c.model).order_by(h.c.id))
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    finally:
        engine.dispose()
    return [(a, b, {"a": 1.0, "b": 0.0, "tie": 0.5}[choice]) for a, b, choice in rows]
