"""Iterated online RLHF with people: `rlhfkit pipeline --feedback db:FILE` queues each round's responses in a real
`rlhfkit label serve`, scripted labellers rank them through its HTTP API, and the run trains on what they gave.
Killing the run while it waits and starting it again loses nothing and queues nothing twice.

RLHFKIT_LABEL_SCREENSHOTS=DIR also saves the admin page's ranking queue while the run waits and when it is done, and
the report's online sections, through Chromium (the pictures in docs/online/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

from rlhfkit.core.losses import elo_ratings
from rlhfkit.evaluate.winrates import ranking_games
from tests.conftest import run_cli
from tests.label.conftest import free_port, start_server

SHOTS = os.environ.get("RLHFKIT_LABEL_SCREENSHOTS")


def label_until(stop: threading.Event, port: int, token: str) -> None:
    """A labeller at work until `stop`: the next ranking item from the queue, ranked shortest response first, and the
    next answer to rate, thumbs up when its length is even."""
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}"

    def post(kind: str, **fields) -> None:
        r = httpx.post(f"{base}/api/{kind}", headers=headers, timeout=30,
                       json={"submission_id": str(uuid.uuid4()), **fields})
        assert r.status_code == 201, r.text

    while not stop.is_set():
        item = httpx.get(f"{base}/api/queue/ranking", headers=headers, timeout=30).json()["item"]
        if item is not None:
            texts = [r["text"] for r in item["responses"]]
            shortest_first = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
            post("rankings", item_id=item["item_id"], ranking=shortest_first)
        rate = httpx.get(f"{base}/api/queue/rating", headers=headers, timeout=30).json()["item"]
        if rate is not None:
            even = len(rate["response"]["text"]) % 2 == 0
            post("ratings", response_id=rate["response_id"], thumbs="up" if even else "down")
        if item is None and rate is None:
            time.sleep(0.2)


def screenshot(name: str, url: str, token: str | None = None, between: tuple[str, str] | None = None) -> None:
    """`url` at 1280 wide, signed in with `token` first, into RLHFKIT_LABEL_SCREENSHOTS/NAME.png; `between`: only the
    part of the page from one heading to the next."""
    from playwright.sync_api import sync_playwright

    from tests.label.test_label_browser import ARGS, CHROMIUM

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        if token:
            page.goto(url.rsplit("/", 1)[0] + "/login")
            page.fill("#token", token)
            page.click("button:has-text('Sign in')")
        page.goto(url)
        path = str(Path(SHOTS) / f"{name}.png")
        if between:
            top, end = (page.locator(f"h2:has-text('{h}')").first.bounding_box() for h in between)
            page.screenshot(path=path, full_page=True,
                            clip={"x": 0, "y": top["y"] - 8, "width": 1280, "height": end["y"] - top["y"]})
        else:
            page.screenshot(path=path, full_page=True)
        browser.close()


def rank_items(db: str) -> int:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM rank_items")).scalar_one()
    engine.dispose()
    return n


def test_two_rounds_of_people_ranking_through_the_app_and_a_kill_while_waiting_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's directories as a user names them: run/sft, run/round1/comparisons, ...
    db = str(tmp_path / "people.sqlite")
    tokens = {n: run_cli("label", "users", "add", "--db", db, "--name", n).stdout.strip() for n in ("ann", "bob")}
    admin = run_cli("label", "users", "add", "--db", db, "--name", "ada", "--admin").stdout.strip()
    port, out = free_port(), Path("run")
    args = ["pipeline", "--preset", "tiny", "--feedback", f"db:{db}", "--online-rounds", "1", "--skip", "dpo",
            "best_of_n", "--label-poll", "0.2", "--use-thumbs", "--output", str(out)]
    server = start_server(db, port)
    stop, people = threading.Event(), []
    try:
        # 1. the run samples the first round, queues it and waits; nobody ranks yet, and the run is killed
        first = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (out / "comparisons" / "queued.json").is_file():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run queued nothing within 300 s"
            time.sleep(0.2)
        time.sleep(1)
        first.kill()
        first.wait()
        assert rank_items(db) == 24 and not (out / "comparisons" / "rankings.jsonl").exists()
        if SHOTS:
            screenshot("queue-waiting", f"http://127.0.0.1:{port}/admin", admin)
        # 2. two people rank through the app while the run, started again, waits for the same items
        people = [threading.Thread(target=label_until, args=(stop, port, t)) for t in tokens.values()]
        for p in people:
            p.start()
        run_cli(*args, timeout=300)
        # the admin page's queue: each round's 24 items under the model that wrote them (the first round's twice,
        # the second batch for the held-out RM), and the rankings in (two people may rank one item, so fewer than
        # 24 items may be ranked at the moment the 24th ranking arrives)
        stats = httpx.get(f"http://127.0.0.1:{port}/api/admin/stats", headers={"Authorization": f"Bearer {admin}"},
                          timeout=30).json()
        # (round 1's items hold the newest policy's responses and its rival's, SFT's)
        queue = {g["batch"]: g for g in stats["ranking_queue"]}
        assert [(b, g["model"], g["wanted"]) for b, g in queue.items()] == [
            (str(out / "comparisons"), str(out / "sft"), 24), (str(out / "comparisons_heldout"), str(out / "sft"), 24),
            (str(out / "round1" / "comparisons"), f"{out / 'ppo'}, {out / 'sft'}", 24)]
        assert all(g["items"] == 24 and 12 <= g["ranked"] <= 24 and g["rankings"] >= 24 for g in queue.values())
        page = httpx.get(f"http://127.0.0.1:{port}/admin", headers={"Authorization": f"Bearer {admin}"},
                         timeout=30).text
        assert f"<td>{out / 'round1' / 'comparisons'}</td>" in page and "<td>24</td>" in page
        if SHOTS:
            screenshot("queue-done", f"http://127.0.0.1:{port}/admin", admin)
            screenshot("report-rounds", (out / "report.html").resolve().as_uri(),
                       between=("Online rounds", "Reward model"))
    finally:
        stop.set()
        for p in people:  # before the server goes: a request cut off mid-way would fail the labeller's thread
            p.join(timeout=60)
        server.terminate()
        server.wait()
    assert rank_items(db) == 72  # 24 per batch: nothing queued twice
    queued = {r: json.loads((out / r / "queued.json").read_text())
              for r in ("comparisons", "comparisons_heldout", "round1/comparisons")}
    rows = {r: [json.loads(x) for x in (out / r / "rankings.jsonl").read_text().splitlines()] for r in queued}
    for r, got in rows.items():
        assert len(got) >= 24 and {x["labeller"] for x in got} <= {"ann", "bob"}
        assert all(sorted(x["ranking"]) == [0, 1, 2] for x in got)  # K = 3, no ties from these labellers
        # each ranking is of responses the run sampled, in the order it queued them
        sampled = {json.dumps(q["prompt"]): q["responses"] for q in queued[r]["rows"]}
        assert all(sampled[json.dumps(x["prompt"])] == x["responses"] for x in got)
    items = [set(q["items"]) for q in queued.values()]
    assert sum(map(len, items)) == len(set.union(*items)) == 72
    # the held-out RM trained on its own batch's rankings alone (the thumbs pairs go to the first RM)
    heldout = [json.loads(x) for side in ("train", "val") if (out / f"rm_heldout_{side}.jsonl").is_file()
               for x in (out / f"rm_heldout_{side}.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, heldout)) == sorted(map(json.dumps, rows["comparisons_heldout"]))
    # round 1's RM trained on both rounds' rankings, old and new mixed, and on the thumbs pairs in by then; one
    # labeller's labels are its validation set, the other's its training set (InstructGPT's held-out labellers)
    both = len(rows["comparisons"]) + len(rows["round1/comparisons"])
    assert len((out / "round1" / "all_rankings.jsonl").read_text().splitlines()) == both
    train, val = ([json.loads(x) for x in (out / "round1" / f"rm_{side}.jsonl").read_text().splitlines()]
                  for side in ("train", "val"))
    assert {x["labeller"] for x in train}.isdisjoint({x["labeller"] for x in val})
    thumbs = [x for x in train + val if len(x["responses"]) == 2]  # the rankings rank K = 3
    assert len(train) + len(val) == both + len(thumbs) and thumbs and all(x["ranking"] == [0, 1] for x in thumbs)
    assert all(len(x["responses"][0]) % 2 == 0 and len(x["responses"][1]) % 2 == 1 for x in thumbs)  # up over down
    rm = json.loads((out / "round1" / "rm" / "run.json").read_text())
    assert rm["config"]["val_data"] == str(out / "round1" / "rm_val.jsonl")
    assert (rm["data"]["data/examples"], rm["data"]["data_val/examples"]) == (len(train), len(val))
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert "ppo" in ev["models"] and "ppo-round1" in ev["models"]
    # round 1 showed PPO's responses beside SFT's (the default one rival), so people's rankings also judged PPO
    # against SFT: the report's Elo row after round 1 has both, from those rankings' games alone
    assert all(x["models"] == ["sft"] * 3 for x in rows["comparisons"])
    assert all(sorted(x["models"]) in (["ppo", "ppo", "sft"], ["ppo", "sft", "sft"])
               for x in rows["round1/comparisons"])
    games = [g for x in rows["round1/comparisons"] for g in ranking_games(x["models"], x["ranking"])]
    assert len(games) == 2 * len(rows["round1/comparisons"])
    elo = elo_ratings(games)
    md = (out / "report.md").read_text()
    assert "## Elo from the people, round by round" in md
    assert f"| after round 1 | {len(games)} | {elo['sft']:.0f} (" in md and f"| {elo['ppo']:.0f} (" in md
