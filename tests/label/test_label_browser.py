"""The pages in a real browser (Debian's Chromium, driven by Playwright): sign in, write a prompt, rank four
responses (buttons, keyboard, a tie, a flag), make an A/B choice in a chat, write a demonstration; then find
exactly those records in the database and in the export. Typed script and SQL text show up as text.

RLHFKIT_LABEL_SCREENSHOTS=DIR also saves each page at 1280×800 and at phone size (the pictures in docs/label/).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from rlhfkit.feedback import export, schema, store
from rlhfkit.label import server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "Explain <script>alert(1)</script> and '; DROP TABLE users; -- to a child."
SHOTS = os.environ.get("RLHFKIT_LABEL_SCREENSHOTS")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no {CHROMIUM}: install Debian's chromium (scripts/setup does, as root)")


@pytest.fixture
def live(tmp_path, tiny_models, generation):
    """The app served by uvicorn on loopback in a thread: (base url, engine, ann's token)."""
    import uvicorn

    app = server.create_app(str(tmp_path / "browser.sqlite"), tiny_models, generation)
    token = store.add_user(app.state.db, "ann", admin=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.db, token
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def sign_in(page, base: str, token: str) -> None:
    page.goto(f"{base}/login")
    shot(page, "login")
    page.fill("#token", token)
    page.click("button:has-text('Sign in')")
    page.wait_for_selector("text=Hello, ann")


def test_label_in_a_browser(live, browser, tmp_path):
    base, engine, token = live
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, base, token)
    shot(page, "home")

    # 1. a prompt with script and SQL in it
    page.goto(f"{base}/prompt")
    page.fill("#text", PROMPT)
    shot(page, "prompt")
    page.click("button:has-text('Save prompt')")
    page.wait_for_selector("text=Saved your prompt")

    # 2. rank four responses: ▼ on the first, ↑ on the last, the third tied with the one above, one flag
    page.goto(f"{base}/rank")
    assert PROMPT in page.inner_text(".conversation")  # shown as text, not run
    items = page.locator("#rank-list li.response")
    assert items.count() == 4
    texts = [items.nth(i).locator(".text").inner_text() for i in range(4)]
    items.nth(0).locator("button.down").click()  # order 1 0 2 3
    page.locator("li[data-index='3']").focus()
    page.keyboard.press("ArrowUp")  # order 1 0 3 2
    page.locator("li[data-index='3'] input.tie").check()  # 3 tied with 0
    page.check("input.flag[value='makes things up']")
    shot(page, "rank")
    page.click("button:has-text('Submit ranking')")
    page.wait_for_selector("text=Saved your ranking")

    # 3. chat: two answers, B is much better, the chat goes on with B
    page.goto(f"{base}/chat")
    page.fill("#message", "Hello, who are you?")
    page.click("#send")
    page.wait_for_selector("#candidates:not([hidden])")
    shown_a, shown_b = page.inner_text("#cand-a .text"), page.inner_text("#cand-b .text")
    page.select_option("#strength", "much better")
    shot(page, "chat")
    page.click("#pick-b")
    page.wait_for_selector("text=Saved. Write your next message.")
    assert page.locator("#conversation .msg.assistant .text").inner_text() == shown_b

    # 4. a demonstration for the prompt of step 1
    page.goto(f"{base}/demonstrate")
    assert PROMPT in page.inner_text(".conversation")
    page.fill("#text", "A script is a list of steps; a table is where a computer keeps lists.")
    shot(page, "demonstrate")
    page.click("button:has-text('Save demonstration')")
    page.wait_for_selector("text=Saved your demonstration")
    for name in ("rate", "history", "admin"):
        page.goto(f"{base}/{name}")
        shot(page, name)
    assert dialogs == []  # no script from the prompt ever ran

    # exactly those records in the database
    with engine.connect() as conn:
        prompt = conn.execute(sa.select(schema.prompts).where(schema.prompts.c.id == 1)).one()
        ranking = conn.execute(sa.select(schema.rankings)).one()
        comparison = conn.execute(sa.select(schema.comparisons)).one()
        demo = conn.execute(sa.select(schema.demonstrations)).one()
        text_of = dict(conn.execute(sa.select(schema.responses.c.id, schema.responses.c.text)).all())
    assert prompt.text == PROMPT
    assert ranking.ranking == [1, [0, 3], 2] and ranking.flags == ["makes things up"]
    assert [text_of[i].strip() for i in ranking.response_ids] == [t.strip() for t in texts]
    assert (comparison.choice, comparison.strength) == ("b", "much better")
    assert (text_of[comparison.response_a].strip(), text_of[comparison.response_b].strip()) == \
        (shown_a.strip(), shown_b.strip())
    assert comparison.context == [{"role": "user", "content": "Hello, who are you?"}]
    assert (demo.prompt_id, demo.text) == (1, "A script is a list of steps; a table is where a computer keeps lists.")

    # and in the export
    db = str(engine.url)
    rows = {}
    for kind in ("sft", "pairs", "rankings"):
        export.export(db, kind, tmp_path / kind, val_fraction=0.0)
        rows[kind] = [json.loads(x) for x in (tmp_path / kind / "train.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in rows["sft"]] == [[{"role": "user", "content": PROMPT},
                                                     {"role": "assistant", "content": demo.text}]]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows["pairs"]] == [
        ("Hello, who are you?", text_of[comparison.response_b], text_of[comparison.response_a])]
    assert [(r["prompt"], r["ranking"], r["labeller"]) for r in rows["rankings"]] == [(PROMPT, [1, [0, 3], 2], "ann")]

    if SHOTS:  # the same pages at phone size
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        sign_in(phone, base, token)
        for name in ("home", "prompt", "rank", "chat", "demonstrate", "rate"):
            phone.goto(f"{base}/{name}")
            shot(phone, f"{name}-phone")
