"""Collected feedback -> training data in rlhfkit's own formats (SPEC §3), split train/validation by person.

- sft:      demonstrations -> conversations `{"messages": [user prompt, assistant demonstration]}` (`rlhfkit sft`)
- pairs:    A/B comparisons (ties left out) -> `{"prompt", "chosen", "rejected"}` (`rlhfkit rm`, `rlhfkit dpo`)
- rankings: K-way rankings -> `{"prompt", "responses", "ranking"}`, ties as nested lists (`rlhfkit rm`)
- thumbs:   thumbs up/down -> pairs: each answer rated up over each answer to the same conversation rated down,
            `{"prompt", "chosen", "rejected"}`; the labeller is whoever gave the down rating

Only the latest version of each record is exported (a correction replaces what it supersedes). A prompt is a
string when the model saw one user message, else the message list. Each row also says who gave it and the ids
it came from, which the readers ignore.

The split puts whole groups on one side: with `labeller`, every record of one person is in train or in
validation, never both; with `prompt_author`, every record about one person's prompts is. Groups are shuffled
with the seed and go to validation until it holds `val_fraction` of the records, so a held-out score measures
how well the model generalises to people it has not seen (InstructGPT's held-out labellers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import sqlalchemy as sa

from rlhfkit.feedback import store
from rlhfkit.feedback.schema import comparisons, demonstrations, prompts, rankings, ratings, responses, users


def _prompt(context: list[dict]):
    return context[0]["content"] if len(context) == 1 else context


def _sft_rows(conn: sa.Connection) -> list[tuple[int, int, dict]]:
    h = store.heads(demonstrations).subquery()
    rows = conn.execute(sa.select(h, prompts.c.text.label("prompt"), prompts.c.labeller_id.label("author"))
                        .join(prompts, prompts.c.id == h.c.prompt_id).order_by(h.c.id))
    return [(r.labeller_id, r.author, {
        "messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.text}],
        "prompt_id": r.prompt_id, "demonstration_id": r.id}) for r in rows]


def _pairs_rows(conn: sa.Connection) -> list[tuple[int, int, dict]]:
    h = store.heads(comparisons).subquery()
    ra, rb = responses.alias("ra"), responses.alias("rb")
    rows = conn.execute(sa.select(h, ra.c.text.label("text_a"), rb.c.text.label("text_b"),
                                  ra.c.model.label("model_a"), rb.c.model.label("model_b"),
                                  prompts.c.labeller_id.label("author"))
                        .join(ra, ra.c.id == h.c.response_a).join(rb, rb.c.id == h.c.response_b)
                        .join(prompts, prompts.c.id == h.c.prompt_id).where(h.c.choice != "tie").order_by(h.c.id))
    out = []
    for r in rows:
        win, lose = (("a", "b") if r.choice == "a" else ("b", "a"))
        out.append((r.labeller_id, r.author, {
            "prompt": _prompt(r.context), "chosen": getattr(r, f"text_{win}"), "rejected": getattr(r, f"text_{lose}"),
            "strength": r.strength, "models": [getattr(r, f"model_{win}"), getattr(r, f"model_{lose}")],
            "prompt_id": r.prompt_id, "comparison_id": r.id}))
    return out


def _rankings_rows(conn: sa.Connection) -> list[tuple[int, int, dict]]:
    h = store.heads(rankings).subquery()
    rows = conn.execute(sa.select(h, prompts.c.labeller_id.label("author"))
                        .join(prompts, prompts.c.id == h.c.prompt_id).order_by(h.c.id)).all()
    shown = {r.id: r for r in conn.execute(sa.select(responses.c.id, responses.c.text, responses.c.context).where(
        responses.c.id.in_({i for r in rows for i in r.response_ids})))}
    return [(r.labeller_id, r.author, {
        "prompt": _prompt(shown[r.response_ids[0]].context), "responses": [shown[i].text for i in r.response_ids],
        "ranking": r.ranking, "flags": r.flags, "prompt_id": r.prompt_id, "ranking_id": r.id}) for r in rows]


def _thumbs_rows(conn: sa.Connection) -> list[tuple[int, int, dict]]:
    """Pairs from thumbs: an answer rated up beats every answer to the same conversation rated down (by anyone: a
    thumb says good or bad in absolute terms, so two people's thumbs compare as one person's would)."""
    h = store.heads(ratings).subquery()
    rows = conn.execute(sa.select(h, responses.c.text, responses.c.context, prompts.c.labeller_id.label("author"))
                        .join(responses, responses.c.id == h.c.response_id)
                        .join(prompts, prompts.c.id == h.c.prompt_id).order_by(h.c.id)).all()
    by_context: dict[str, list] = {}
    for r in rows:
        by_context.setdefault(json.dumps(r.context, sort_keys=True), []).append(r)
    out = []
    for rated in by_context.values():
        for up in (r for r in rated if r.thumbs > 0):
            for down in (r for r in rated if r.thumbs < 0 and r.response_id != up.response_id):
                out.append((down.labeller_id, up.author, {
                    "prompt": _prompt(up.context), "chosen": up.text, "rejected": down.text,
                    "prompt_id": up.prompt_id, "rating_ids": [up.id, down.id]}))
    return out


EXPORTERS = {"sft": _sft_rows, "pairs": _pairs_rows, "rankings": _rankings_rows, "thumbs": _thumbs_rows}


def split_groups(sizes: dict[str, int], val_fraction: float, seed: int) -> set[str]:
    """The groups that go to validation: shuffled, taken until they hold `val_fraction` of all records. At least
    one group stays in train."""
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target, held, val = val_fraction * sum(sizes.values()), 0, set()
    for group in order[:-1]:
        if held >= target or val_fraction <= 0:
            break
        val.add(group)
        held += sizes[group]
    return val


def export(db: str, kind: str, output: str | Path, split_by: str = "labeller", val_fraction: float = 0.2,
           seed: int = 0) -> dict:
    """Write OUTPUT/train.jsonl, OUTPUT/validation.jsonl and OUTPUT/export.json (counts, who is on which side)."""
    engine = store.open_engine(db, create=False)
    try:
        with engine.connect() as conn:
            names = dict(conn.execute(sa.select(users.c.id, users.c.name)).all())
            rows = EXPORTERS[kind](conn)
    finally:
        engine.dispose()
    group_of = {"labeller": lambda r: names[r[0]], "prompt_author": lambda r: names[r[1]]}[split_by]
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[group_of(r)] = sizes.get(group_of(r), 0) + 1
    val_groups = split_groups(sizes, val_fraction, seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    sides = {"train": [], "validation": []}
    for r in rows:
        sides["validation" if group_of(r) in val_groups else "train"].append(
            {**r[2], "labeller": names[r[0]], "prompt_author": names[r[1]]})
    for side, items in sides.items():
        (out / f"{side}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    summary = {"kind": kind, "split_by": split_by, "train": len(sides["train"]),
               "validation": len(sides["validation"]), "train_groups": sorted(set(sizes) - val_groups),
               "validation_groups": sorted(val_groups), "output": str(out)}
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
