"""From people to a model: A/B comparisons made through the API are exported (by the CLI, as a user would) and
train a reward model; the CLI's users add / users revoke / export / serve --help behave."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, train_losses


def test_comparisons_exported_train_a_reward_model(lab, tmp_path, one_thread):
    from rlhfkit.algos.reward import RMConfig, train

    client, people, engine = lab
    for person, opener in [(people["ann"], "Hi there"), (people["bob"], "Good morning"), (people["ann"], "Hey")]:
        turn = person.post("/api/chat/turn", {"messages": [{"role": "user", "content": opener}]}).json()
        a, b = turn["candidates"]
        r = person.submit("comparisons", response_a=a["id"], response_b=b["id"], choice="a", strength="better")
        assert r.status_code == 201
    db = str(engine.url).removeprefix("sqlite:///")
    out = tmp_path / "pairs"
    summary = json.loads(run_cli("label", "export", "--db", db, "--kind", "pairs", "--split-by", "labeller",
                                 "--output", str(out), "--val-fraction", "0.3").stdout)
    assert (summary["train"], summary["validation"]) in [(2, 1), (1, 2)]
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["prompt"] in ("Hi there", "Good morning", "Hey") and r["chosen"] != r["rejected"] for r in rows)
    data = out / "all.jsonl"
    data.write_text((out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text())
    train(RMConfig(model="tiny-llama", data=str(data), output=str(tmp_path / "rm"), max_steps=2, batch_size=2,
                   dtype="fp32", val_fraction=0.0))
    metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["data/examples"] == 3  # every exported comparison was read
    assert len(train_losses(tmp_path / "rm")) == 2 and (tmp_path / "rm" / "model.safetensors").is_file()
    # the same comparisons are games between the two served models: Elo from people's choices
    ev_dir = tmp_path / "eval"
    run_cli("eval", "--judge", f"db:{db}", "--output", str(ev_dir), "--bootstrap", "50")
    ev = json.loads((ev_dir / "eval.json").read_text())
    assert ev["games"] == 3 and len(ev["elo"]) == 2 and sum(ev["elo"].values()) / 2 == pytest.approx(1000)
    (a_name, b_name) = sorted(ev["elo"])
    wr = ev["win_rates"][a_name][b_name]
    assert wr["n"] == 3 and wr["win_rate"] + ev["win_rates"][b_name][a_name]["win_rate"] == pytest.approx(1)
    assert (ev_dir / "elo.png").is_file() and "3 human A/B comparisons" in (ev_dir / "eval.md").read_text()
    missing = run_cli("eval", "--judge", f"db:{tmp_path / 'nope.sqlite'}", "--output", str(ev_dir), check=False)
    assert missing.returncode == 2 and f"--judge db:{tmp_path / 'nope.sqlite'}: no such database" in missing.stderr


def test_cli_users_add_and_errors(tmp_path):
    db = str(tmp_path / "cli.sqlite")
    proc = run_cli("label", "users", "add", "--db", db, "--name", "ann", "--admin")
    token = proc.stdout.strip()
    assert len(token) >= 30 and "token" in proc.stderr
    from rlhfkit.feedback import store

    engine = store.open_engine(db)
    user = store.user_by_token(engine, token)
    engine.dispose()
    assert user.name == "ann" and user.is_admin
    again = run_cli("label", "users", "add", "--db", db, "--name", "ann", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr and "Traceback" not in again.stderr
    nameless = run_cli("label", "users", "add", "--db", db, check=False)
    assert nameless.returncode == 2 and "--name is required" in nameless.stderr
    stranger = run_cli("label", "users", "revoke", "zed", "--db", db, check=False)
    assert stranger.returncode == 1 and stranger.stderr.splitlines() == ["error: no user named 'zed'"]
    bad = run_cli("label", "export", "--db", db, "--kind", "essays", check=False)
    assert bad.returncode == 2 and "essays" in bad.stderr
    helped = run_cli("label", "serve", "--help")
    assert "--model" in helped.stdout and "127.0.0.1" in helped.stdout


@pytest.mark.parametrize("argv, models", [(["--model", "a", "--model", "b", "--port", "1"], ["a", "b"]),
                                          (["--model", "a", "b"], ["a", "b"]), (["--model=a"], ["a"]), ([], [])])
def test_serve_takes_repeated_models(argv, models):
    from rlhfkit.config import parse_args
    from rlhfkit.label.commands import ServeConfig, repeated_as_list

    assert parse_args(ServeConfig, repeated_as_list(argv, "model")).model == models


def test_thumbs_export_as_pairs_of_an_up_over_a_down_answer_to_one_conversation(lab, tmp_path):
    client, people, engine = lab
    turn = people["ann"].post("/api/chat/turn", {"messages": [{"role": "user", "content": "Hi there"}]}).json()
    a, b = turn["candidates"]
    assert people["ann"].submit("ratings", response_id=a["id"], thumbs="up").status_code == 201
    assert people["bob"].submit("ratings", response_id=b["id"], thumbs="down").status_code == 201
    other = people["ann"].post("/api/chat/turn", {"messages": [{"role": "user", "content": "Bye"}]}).json()
    assert people["ann"].submit("ratings", response_id=other["candidates"][0]["id"], thumbs="down").status_code == 201
    db = str(engine.url).removeprefix("sqlite:///")
    out = tmp_path / "thumbs"
    run_cli("label", "export", "--db", db, "--kind", "thumbs", "--output", str(out), "--val-fraction", "0")
    (row,) = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]  # "Bye" has no answer rated up
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("Hi there", a["text"], b["text"])
    assert row["labeller"] == "bob"  # who rated the losing answer down
