"""Reading the feedback back: a labeller's own records, progress and agreement between labellers (the admin
page), and the A/B games `rlhfkit eval --judge db:FILE` turns into Elo."""

from __future__ import annotations

import sqlalchemy as sa

from rlhfkit.feedback.schema import KINDS, batches, comparisons, rank_items, rankings, responses, users
from rlhfkit.feedback.store import User, heads, open_engine


def history(engine: sa.Engine, user: User, limit: int = 200) -> dict[str, list[dict]]:
    """The user's own records of each kind, newest first."""
    with engine.connect() as conn:
        return {kind: [dict(r._mapping) for r in conn.execute(
            sa.select(t).where(t.c.labeller_id == user.id).order_by(t.c.id.desc()).limit(limit))]
            for kind, t in KINDS.items()}


def stats(engine: sa.Engine) -> dict:
    """Progress (records per kind and labeller), agreement between labellers on the same items, and the ranking
    queue by model (`ranking_queue`)."""
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
        queued = conn.execute(sa.select(rank_items.c.id, rank_items.c.response_ids, batches.c.name, batches.c.wanted)
                              .outerjoin(batches, batches.c.id == rank_items.c.batch_id)).all()
        shown = {i for q in queued for i in q.response_ids}
        made = {r.id: (r.model, r.model_revision) for r in conn.execute(
            sa.select(responses.c.id, responses.c.model, responses.c.model_revision)
            .where(responses.c.id.in_(shown)))}
        items = [(q.id, (q.name, q.wanted), sorted({made[i] for i in q.response_ids})) for q in queued]
    return {"records": per_kind, "ranking_agreement": ranking_agreement(ranked),
            "comparison_agreement": comparison_agreement(compared), "ranking_queue": ranking_queue(items, ranked)}


def ranking_queue(items, ranked) -> list[dict]:
    """The ranking queue by batch (a training run's round: its name and the rankings it waits for) and by the models
    (and revisions) whose responses the items hold, as ", "-joined names; items the app made itself have no batch.
    Per group: items, how many have a ranking, rankings in all, rankings wanted."""
    per_item: dict[int, int] = {}
    for item_id, _, _ in ranked:
        per_item[item_id] = per_item.get(item_id, 0) + 1
    groups: dict[tuple, dict] = {}
    for item_id, (batch, wanted), made_by in items:
        g = groups.setdefault((batch, tuple(made_by)), {
            "batch": batch, "wanted": wanted, "model": ", ".join(m for m, _ in made_by),
            "revision": ", ".join(r for _, r in made_by), "items": 0, "ranked": 0, "rankings": 0})
        g["items"] += 1
        g["ranked"] += item_id in per_item
        g["rankings"] += per_item.get(item_id, 0)
    return list(groups.values())


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


def comparison_games(db_url: str, option: str = "--db ") -> list[tuple[str, str, float]]:
    """One (model_a, model_b, outcome) per A/B comparison (latest versions) between responses of two different
    models: outcome 1 if a's response won, 0 if b's, 0.5 for a tie; the games `elo_ratings` takes. `option`: the
    command-line option that named the database, for `open_engine`'s errors."""
    engine = open_engine(db_url, create=False, option=option)
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
