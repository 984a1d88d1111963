"""A round of people's rankings for a training run: put K sampled responses per prompt into the labelling app's
ranking queue (each response recording the model and revision that wrote it), wait until enough rankings are in,
and read them back as rankings rows.

The pipeline calls `queue` once per comparisons stage and records the item ids beside its output, so a run killed
while it waits and started again waits for the same items instead of queueing them twice. Rankings are read from
the database the app writes (SQLite serialises the two writers); the app needs nothing from the run.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from rlhfkit.feedback import store
from rlhfkit.feedback.schema import rank_items, rankings, users

RUN_USER = "rlhfkit-run"  # who the queued prompts and responses are recorded as (it has no usable token)


@dataclass(frozen=True)
class Ranked:
    """One person's latest ranking of a queued item."""

    item: int  # index into the queued rows, not the database id
    ranking: list  # best first, indices into the item's responses, ties as nested lists
    labeller: str


def run_user(engine: sa.Engine) -> store.User:
    """The account queued items are recorded under; made on first use with a token nobody is shown."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.name == RUN_USER)).first()
    if row is None:
        store.add_user(engine, RUN_USER)  # its token is dropped: nobody signs in as the run
        return run_user(engine)
    return store.User(row.id, row.name, row.is_admin)


def queue(db: str, rows: list[dict], sources: list[list[tuple[str, str]]], settings: dict, name: str,
          wanted: int) -> list[int]:
    """Each row ({"prompt": messages ending with a user turn, "responses": K texts}) as a prompt, its K responses
    and one rank item in the app's ranking queue, in one batch called `name` waiting for `wanted` rankings (the
    admin page shows it); `sources[i][j]`: the (model, revision) that wrote row i's response j. The rank items'
    ids, in row order."""
    engine = store.open_engine(db)
    try:
        user = run_user(engine)
        batch, items = store.add_batch(engine, name, wanted), []
        for row, by in zip(rows, sources, strict=True):
            prompt_id = store.submit(engine, user, "prompt", {"submission_id": str(uuid.uuid4()),
                                                               "text": row["prompt"][-1]["content"]})
            ids = store.add_responses(engine, user, prompt_id, row["prompt"],
                                      [(model, revision, settings, text)
                                       for (model, revision), text in zip(by, row["responses"], strict=True)])
            items.append(store.add_rank_item(engine, prompt_id, ids, batch))
        return items
    finally:
        engine.dispose()


def ranked(engine: sa.Engine, items: list[int]) -> list[Ranked]:
    """Everyone's latest ranking of `items` (a correction replaces what it corrects), oldest first."""
    position = {item: i for i, item in enumerate(items)}
    with engine.connect() as conn:
        h = store.heads(rankings).subquery()
        rows = conn.execute(sa.select(h.c.item_id, h.c.ranking, users.c.name)
                            .join(users, users.c.id == h.c.labeller_id)
                            .where(h.c.item_id.in_(items)).order_by(h.c.id)).all()
    return [Ranked(position[r.item_id], r.ranking, r.name) for r in rows]


def pairs(db: str) -> list[dict]:
    """People's A/B choices (ties left out) and thumbs pairs (`export`'s pairs and thumbs kinds) as K = 2 rankings
    rows, with who gave each, for a reward model beside the rankings."""
    from rlhfkit.feedback.export import EXPORTERS

    engine = store.open_engine(db, create=False)
    try:
        with engine.connect() as conn:
            names = dict(conn.execute(sa.select(users.c.id, users.c.name)).all())
            rows = EXPORTERS["pairs"](conn) + EXPORTERS["thumbs"](conn)
    finally:
        engine.dispose()
    return [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "ranking": [0, 1],
             "labeller": names[labeller]} for labeller, _, r in rows]


def wait(db: str, items: list[int], wanted: int, poll_s: float, what: str) -> list[Ranked]:
    """People's rankings of `items` once `wanted` of them are in, checked every `poll_s` seconds; the count is shown
    as it grows. Interrupting loses nothing: the rankings stay in the database."""
    from tqdm.auto import tqdm

    engine = store.open_engine(db, create=False)  # once for the whole wait: opening also checks the schema
    try:
        batch = store.get(engine, rank_items, items[0], "rank item")["batch_id"]
        if batch is not None:  # a rerun may ask for a different number
            store.set_wanted(engine, batch, wanted)
        got = ranked(engine, items)
        with tqdm(total=wanted, initial=min(len(got), wanted), desc=f"{what}: rankings in", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            while len(got) < wanted:
                time.sleep(poll_s)
                got = ranked(engine, items)
                bar.update(min(len(got), wanted) - bar.n)
    finally:
        engine.dispose()
    return got
