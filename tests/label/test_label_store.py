"""The feedback store on its own: schema and migrations, tokens, durability settings, atomic submissions,
corrections, Elo games and agreement, and the export's split by person."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from rlhfkit.feedback import export, progress, schema, store
from tests.label.conftest import count


@pytest.fixture
def engine(tmp_path):
    engine = store.open_engine(str(tmp_path / "f.sqlite"))
    yield engine
    engine.dispose()


def user(engine, name, admin=False) -> store.User:
    return store.user_by_token(engine, store.add_user(engine, name, admin))


def sub(**fields) -> dict:
    return {"submission_id": str(uuid.uuid4()), **fields}


def test_schema_version_migrations_and_sqlite_settings(tmp_path, monkeypatch):
    path = str(tmp_path / "f.sqlite")
    engine = store.open_engine(path)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one() == len(schema.MIGRATIONS)
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar_one() == 1
        assert conn.execute(sa.text("PRAGMA synchronous")).scalar_one() == 2  # FULL
    engine.dispose()
    # a later release appends a migration: an existing database runs it once, keeping its data
    ran = []
    monkeypatch.setattr(store, "MIGRATIONS", schema.MIGRATIONS + [lambda conn: ran.append(1)])
    assert store.migrate(store.open_engine(path)) == len(schema.MIGRATIONS) + 1 and ran == [1]
    assert store.migrate(store.open_engine(path)) == len(schema.MIGRATIONS) + 1 and ran == [1]


def test_a_database_from_before_revocation_is_upgraded_in_place(tmp_path):
    path = str(tmp_path / "old.sqlite")
    engine = store.open_engine(path)
    token = store.add_user(engine, "ann")
    pid = store.submit(engine, store.user_by_token(engine, token), "prompt", sub(text="kept"))
    with engine.begin() as conn:  # what version 1 left: no users.revoked
        conn.execute(sa.text("ALTER TABLE users DROP COLUMN revoked"))
        conn.execute(sa.text("UPDATE schema_version SET version = 1"))
    engine.dispose()
    engine = store.open_engine(path)
    assert store.user_by_token(engine, token).name == "ann"  # everyone stays active
    assert store.revoke_user(engine, "ann") == 0 and store.user_by_token(engine, token) is None
    assert store.get(engine, schema.prompts, pid, "prompt")["text"] == "kept"
    engine.dispose()


def test_a_database_from_before_batches_is_upgraded_in_place(tmp_path):
    """Version 2 had no batches and no rank_items.batch_id: the items it holds stay, in no batch, and a run's
    round can then queue a batch beside them."""
    path = str(tmp_path / "old.sqlite")
    engine = store.open_engine(path)
    ann = user(engine, "ann")
    pid = store.submit(engine, ann, "prompt", sub(text="p"))
    ids = store.add_responses(engine, ann, pid, [{"role": "user", "content": "p"}], [("m", "r", {}, "x")] * 2)
    old_item = store.add_rank_item(engine, pid, ids)
    with engine.begin() as conn:  # what version 2 left
        conn.execute(sa.text("CREATE TABLE old (id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES "
                             "prompts (id), response_ids JSON NOT NULL, created VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO old SELECT id, prompt_id, response_ids, created FROM rank_items"))
        conn.execute(sa.text("DROP TABLE rank_items"))
        conn.execute(sa.text("ALTER TABLE old RENAME TO rank_items"))
        conn.execute(sa.text("DROP TABLE batches"))
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
    engine.dispose()
    engine = store.open_engine(path)
    new_item = store.add_rank_item(engine, pid, ids, store.add_batch(engine, "runs/x/round1/comparisons", 5))
    queue = progress.stats(engine)["ranking_queue"]
    assert [(g["batch"], g["wanted"], g["items"]) for g in queue] == [(None, None, 1),
                                                                      ("runs/x/round1/comparisons", 5, 1)]
    assert store.get(engine, schema.rank_items, old_item, "rank item")["batch_id"] is None
    assert store.get(engine, schema.rank_items, new_item, "rank item")["batch_id"] == 1
    engine.dispose()


def test_tokens_are_stored_only_as_hashes(engine):
    token = store.add_user(engine, "ann")
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.users)).one()
    assert row.token_hash == store.token_hash(token) and token not in json.dumps(list(row), default=str)
    assert store.user_by_token(engine, token).name == "ann"
    assert store.user_by_token(engine, token + "x") is None
    with pytest.raises(store.Conflict):
        store.add_user(engine, "ann")
    with pytest.raises(store.Invalid):
        store.add_user(engine, "  ")


def test_a_failed_submission_stores_nothing(engine):
    ann = user(engine, "ann")
    body = sub(text="a prompt")
    store.submit(engine, ann, "prompt", body)
    with pytest.raises(store.Conflict):
        store.submit(engine, ann, "prompt", body)
    with pytest.raises(store.Conflict):  # submission ids are unique across kinds
        store.submit(engine, ann, "demonstration", {**body, "prompt_id": 1, "text": "x"})
    with pytest.raises(store.NotFound):
        store.submit(engine, ann, "demonstration", sub(prompt_id=5, text="x"))
    assert (count(engine, schema.prompts), count(engine, schema.demonstrations), count(engine, schema.submissions)) \
        == (1, 0, 1)


def feedback_db(engine, people: dict[str, int]) -> None:
    """Each person writes a prompt and `n` demonstrations, comparisons and rankings on it."""
    for name, n in people.items():
        u = user(engine, name)
        pid = store.submit(engine, u, "prompt", sub(text=f"{name}'s prompt"))
        context = [{"role": "user", "content": f"{name}'s prompt"}]
        ids = store.add_responses(engine, u, pid, context, [
            (m, "rev", {"seed": i}, f"{name} answer {i}") for i, m in enumerate(["m1", "m2", "m1"])])
        item = store.add_rank_item(engine, pid, ids)
        for i in range(n):
            store.submit(engine, u, "demonstration", sub(prompt_id=pid, text=f"{name} demo {i}"))
            store.submit(engine, u, "comparison", sub(response_a=ids[0], response_b=ids[1], choice="a",
                                                      strength="better"))
            store.submit(engine, u, "ranking", sub(item_id=item, ranking=[2, [0, 1]]))


def test_export_splits_by_labeller(engine, tmp_path):
    from rlhfkit.data import formats

    feedback_db(engine, {"ann": 3, "bob": 2, "cat": 4, "dan": 1, "eve": 2})
    db = str(engine.url)
    for kind in ("sft", "pairs", "rankings"):
        out = tmp_path / kind
        summary = export.export(db, kind, out, "labeller", val_fraction=0.2, seed=0)
        train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
        val = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
        assert len(train) + len(val) == 12 and val and train
        assert not {r["labeller"] for r in train} & {r["labeller"] for r in val}  # nobody on both sides
        assert {r["labeller"] for r in val} == set(summary["validation_groups"])
        assert summary == json.loads((out / "export.json").read_text())
        # what rlhfkit's own readers take (sft reads conversations, rm and dpo read pairs and rankings)
        if kind == "sft":
            assert len(formats.read(str(out / "train.jsonl"), formats.to_conversation)[0]) == len(train)
        else:
            prefs = formats.read(str(out / "train.jsonl"), formats.to_preference)[0]
            assert len(prefs) == len(train)
            assert prefs[0].pairs == ([(0, 1)] if kind == "pairs" else [(2, 0), (2, 1)])
    row = json.loads((tmp_path / "rankings" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].endswith("'s prompt") and row["ranking"] == [2, [0, 1]] and len(row["responses"]) == 3
    again = export.export(db, "pairs", tmp_path / "again", "labeller", 0.2, seed=0)
    assert again["validation_groups"] == summary["validation_groups"]  # seeded
    assert export.export(db, "pairs", tmp_path / "none", "labeller", 0.0)["validation"] == 0


def test_export_keeps_the_latest_version_and_drops_ties(engine, tmp_path):
    ann = user(engine, "ann")
    pid = store.submit(engine, ann, "prompt", sub(text="p"))
    ids = store.add_responses(engine, ann, pid, [{"role": "user", "content": "p"}],
                              [("m1", "r", {}, "x"), ("m2", "r", {}, "y")])
    first = store.submit(engine, ann, "comparison", sub(response_a=ids[0], response_b=ids[1], choice="a",
                                                        strength="better"))
    store.submit(engine, ann, "comparison", sub(response_a=ids[0], response_b=ids[1], choice="b",
                                                strength="slightly better", supersedes=first))
    store.submit(engine, ann, "comparison", sub(response_a=ids[1], response_b=ids[0], choice="tie"))
    export.export(str(engine.url), "pairs", tmp_path / "out", val_fraction=0.0)
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"], r["strength"], r["models"]) for r in rows] == [
        ("y", "x", "slightly better", ["m2", "m1"])]
    assert progress.comparison_games(str(engine.url)) == [("m1", "m2", 0.0), ("m2", "m1", 0.5)]


def test_split_groups_never_empties_train():
    assert export.split_groups({"a": 5}, 0.5, 0) == set()
    val = export.split_groups({"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, 0.4, 3)
    assert len(val) == 2


def test_agreement_statistics():
    # two people rank items 1 and 2; on item 1 they agree on 2 of the 3 strictly ordered pairs
    rows = [(1, "ann", [0, 1, 2]), (1, "bob", [1, 0, 2]), (2, "ann", [[0, 1]]), (2, "bob", [0, 1])]
    assert progress.ranking_agreement(rows) == {"pairs": 3, "agreement": 2 / 3}
    # the same pair shown the other way round counts as the same comparison
    rows = [(5, 6, "ann", "a"), (6, 5, "bob", "b"), (5, 6, "cat", "b"), (7, 8, "ann", "a")]
    assert progress.comparison_agreement(rows) == {"pairs": 3, "agreement": 1 / 3}


def test_the_reports_chat_games_are_those_between_the_runs_models(engine, tmp_path, monkeypatch):
    """People's chat A/B choices between two of a pipeline run's models (served from their directories, named
    relative or absolute) become games between the report's names; a comparison with any other model does not."""
    from rlhfkit.evaluate.report import chat_games
    from rlhfkit.pipeline import PipelineConfig

    monkeypatch.chdir(tmp_path)
    ann = user(engine, "ann")
    pid = store.submit(engine, ann, "prompt", sub(text="p"))
    ids = store.add_responses(engine, ann, pid, [{"role": "user", "content": "p"}],
                              [("run/ppo", "r", {}, "x"), (str(tmp_path / "run" / "sft"), "r", {}, "y"),
                               ("smollm2-135m", "r", {}, "z")])
    store.submit(engine, ann, "comparison", sub(response_a=ids[0], response_b=ids[1], choice="a", strength="better"))
    store.submit(engine, ann, "comparison", sub(response_a=ids[1], response_b=ids[2], choice="b", strength="better"))
    policies = {"sft": str(tmp_path / "run" / "sft"), "ppo": "run/ppo", "ppo-round1": "run/round1/ppo"}
    cfg = PipelineConfig(feedback=f"db:{engine.url.database}")
    assert chat_games(cfg, policies) == [("ppo", "sft", 1.0)]
    assert chat_games(PipelineConfig(), policies) == []
