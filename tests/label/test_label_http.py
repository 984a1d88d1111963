"""Every endpoint of the labelling app over HTTP (starlette's TestClient), with the tiny models answering.

Each bad request gets a clear 4xx and stores nothing; people only see and correct their own records; what a
person typed is stored verbatim and shown inert."""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa

from rlhfkit.feedback import progress, schema
from tests.label.conftest import count

XSS = "<script>alert(1)</script>"
SQL = "'; DROP TABLE users; --"


def new_id() -> str:
    return str(uuid.uuid4())


def rank_item(person) -> dict:
    r = person.get("/api/queue/ranking")
    assert r.status_code == 200, r.text
    return r.json()["item"]


def chat_turn(person, messages, prompt_id=None) -> dict:
    r = person.post("/api/chat/turn", {"messages": messages, "prompt_id": prompt_id})
    assert r.status_code == 200, r.text
    return r.json()


def test_no_or_wrong_token_is_401_and_stores_nothing(lab):
    client, people, engine = lab
    for url in ("/", "/rank", "/api/me", "/api/history", "/api/queue/ranking", "/api/admin/stats"):
        assert client.get(url).status_code == 401, url
        assert client.get(url, headers={"Authorization": "Bearer not-a-token"}).status_code == 401, url
    r = client.post("/api/prompts", json={"submission_id": new_id(), "text": "hi"})
    assert r.status_code == 401 and "sign in" in r.json()["error"]
    r = client.post("/api/prompts", json={"submission_id": new_id(), "text": "hi"},
                    headers={"Authorization": "Bearer " + people["ann"].token[:-1]})
    assert r.status_code == 401
    assert client.get("/").text.count('name="token"') == 1  # the page offers the sign-in form
    assert count(engine, schema.prompts) == 0


def test_sign_in_session_cookie_csrf_and_sign_out(lab):
    client, people, engine = lab
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    r = client.post("/login", data={"token": people["ann"].token}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and people["ann"].token.lower() not in cookie
    home = client.get("/")
    assert home.status_code == 200 and "Hello, ann" in home.text
    csrf = home.text.split('name="csrf" content="')[1].split('"')[0]
    # a post that rides on the cookie needs the session's CSRF token
    body = {"submission_id": new_id(), "text": "a prompt"}
    assert client.post("/api/prompts", json=body).status_code == 403
    assert client.post("/api/prompts", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    form = {"submission_id": new_id(), "text": "from the form"}
    assert client.post("/api/prompts", data=form).status_code == 403
    assert count(engine, schema.prompts) == 0
    assert client.post("/api/prompts", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    r = client.post("/api/prompts", data={**form, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/prompt?saved=prompt"
    assert count(engine, schema.prompts) == 2
    assert client.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    client.cookies.clear()
    assert client.get("/api/me").status_code == 401


def test_prompts_and_every_malformed_submission(lab):
    client, people, engine = lab
    ann = people["ann"]
    sid = new_id()
    r = ann.post("/api/prompts", {"submission_id": sid, "text": "Name three birds."})
    assert r.status_code == 201 and r.json() == {"kind": "prompt", "id": 1, "submission_id": sid}
    bad = [
        (ann.post("/api/prompts", {"submission_id": sid, "text": "Name three birds."}), 409),  # replay
        (ann.post("/api/prompts", {"submission_id": sid, "text": "something else"}), 409),  # same id, new text
        (ann.post("/api/prompts", {"submission_id": "not-a-uuid", "text": "x"}), 422),
        (ann.post("/api/prompts", {"text": "no submission id"}), 422),
        (ann.post("/api/prompts", {"submission_id": new_id(), "text": "   "}), 422),
        (ann.post("/api/prompts", {"submission_id": new_id(), "text": 7}), 422),
        (ann.post("/api/prompts", ["a", "list"]), 400),
        (client.post("/api/prompts", content=b"{not json", headers={**ann.headers, "content-type": "application/json"}),
         400),
        (client.post("/api/prompts", content=b"text=hi", headers={**ann.headers, "content-type": "text/plain"}), 415),
        (ann.post("/api/prompts", {"submission_id": new_id(), "text": "x" * 20_000}), 413),  # over the 16 KiB limit
        (ann.post("/api/nonsense", {"submission_id": new_id()}), 404),
        (ann.get("/api/queue/nonsense"), 404),
        (ann.get("/no-such-page"), 404),
    ]
    for response, status in bad:
        assert response.status_code == status, (status, response.text)
        if response.headers["content-type"].startswith("application/json"):
            assert response.json()["error"]  # a message a person can act on
    # a body that streams in without a Content-Length is cut off too
    chunks = (b'{"text": "' + b"x" * 1024 for _ in range(20))
    r = client.post("/api/prompts", content=chunks, headers={**ann.headers, "content-type": "application/json"})
    assert r.status_code == 413
    assert count(engine, schema.prompts) == 1 and count(engine, schema.submissions) == 1


def test_what_json_allows_but_the_database_cannot_store_is_a_4xx(lab):
    # each of these used to end in a 500: a lone surrogate, an id past SQLite's 64 bits, JSON nested deeper than
    # the parser recurses (yet under the size limit), and a form id of digits int() refuses
    client, people, engine = lab
    ann = people["ann"]
    assert ann.submit("prompts", text="a prompt").status_code == 201
    as_json = {**ann.headers, "content-type": "application/json"}
    surrogate = b'{"submission_id": "%s", "text": "caf\\ud800"}' % new_id().encode()
    deep = b'{"submission_id": "%s", "text": %s}' % (new_id().encode(), b"[" * 7000 + b"]" * 7000)
    cases = [
        (client.post("/api/prompts", content=surrogate, headers=as_json), 400, "lone surrogate"),
        (ann.submit("demonstrations", prompt_id=2**63, text="x"), 400, "out of range"),
        (ann.submit("demonstrations", prompt_id=-(2**63) - 1, text="x"), 400, "out of range"),
        (client.post("/api/prompts", content=deep, headers=as_json), 400, "nested too deeply"),
        (client.post("/api/demonstrations", data={"submission_id": new_id(), "prompt_id": "²", "text": "x"},
                     headers=ann.headers), 422, ""),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    assert ann.submit("demonstrations", prompt_id=2**63 - 1, text="x").status_code == 404  # in range, no such prompt
    assert count(engine, schema.prompts) == 1 and count(engine, schema.demonstrations) == 0


def test_demonstration_queue_hands_out_unseen_prompts(lab):
    client, people, engine = lab
    ann, bob = people["ann"], people["bob"]
    assert ann.get("/api/queue/demonstration").json() == {"item": None}
    for text in ("first prompt", "second prompt"):
        assert bob.submit("prompts", text=text).status_code == 201
    item = ann.get("/api/queue/demonstration").json()["item"]
    assert ann.get("/api/queue/demonstration").json()["item"] == item  # the same until labelled
    assert ann.submit("demonstrations", prompt_id=item["prompt_id"], text="A demonstration.").status_code == 201
    second = ann.get("/api/queue/demonstration").json()["item"]
    assert second["prompt_id"] != item["prompt_id"]
    assert ann.submit("demonstrations", prompt_id=second["prompt_id"], text="Another.").status_code == 201
    assert ann.get("/api/queue/demonstration").json() == {"item": None}  # ann has seen both
    assert bob.get("/api/queue/demonstration").json()["item"]["prompt_id"] == 1
    assert ann.submit("demonstrations", prompt_id=99, text="x").status_code == 404
    assert ann.submit("demonstrations", prompt_id="1", text="x").status_code == 422
    assert ann.submit("demonstrations", prompt_id=1, text="").status_code == 422
    assert count(engine, schema.demonstrations) == 2


def test_rankings_with_ties_flags_and_bad_input(lab):
    client, people, engine = lab
    ann, bob = people["ann"], people["bob"]
    assert rank_item(ann) is None  # no prompt yet
    ann.submit("prompts", text="Tell me a joke.")
    item = rank_item(ann)
    assert len(item["responses"]) == 4 and item["context"] == [{"role": "user", "content": "Tell me a joke."}]
    assert "model" not in item["responses"][0]  # blind
    for ranking, status in [([0, 1, 2], 422), ([0, 1, 2, 2], 422), ([0, 1, 2, 4], 422), ([[0, 1], [], 2, 3], 422),
                            ("0123", 422), ([0, 1, 2, True], 422)]:
        assert ann.submit("rankings", item_id=item["item_id"], ranking=ranking).status_code == status, ranking
    assert ann.submit("rankings", item_id=999, ranking=[0, 1, 2, 3]).status_code == 404
    assert ann.submit("rankings", item_id=item["item_id"], ranking=[0, 1, 2, 3], flags="x").status_code == 422
    r = ann.submit("rankings", item_id=item["item_id"], ranking=[[0, 2], 1, 3], flags=["makes things up"])
    assert r.status_code == 201
    assert rank_item(bob)["item_id"] == item["item_id"]  # the same K responses go to the next person
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.rankings)).one()
        shown = conn.execute(sa.select(schema.responses)).all()
    assert row.ranking == [[0, 2], 1, 3] and row.flags == ["makes things up"]
    assert row.response_ids == [r["id"] for r in item["responses"]]
    assert {s.model for s in shown} <= {"tiny-llama", str(client.app.state.models.names[1])}
    assert all(s.settings["max_new_tokens"] == 8 and "seed" in s.settings and s.model_revision for s in shown)
    assert [s.text for s in shown] == [r["text"] for r in item["responses"]]  # exactly what was shown


def test_chat_turns_and_ab_comparisons(lab):
    client, people, engine = lab
    ann = people["ann"]
    first = chat_turn(ann, [{"role": "user", "content": "Hello!"}])
    a, b = first["candidates"]
    assert ann.submit("comparisons", response_a=a["id"], response_b=b["id"], choice="sideways").status_code == 422
    assert ann.submit("comparisons", response_a=a["id"], response_b=b["id"], choice="a",
                      strength="enormously").status_code == 422
    assert ann.submit("comparisons", response_a=a["id"], response_b=a["id"], choice="a",
                      strength="better").status_code == 422
    assert ann.submit("comparisons", response_a=a["id"], response_b=999, choice="a",
                      strength="better").status_code == 404
    r = ann.submit("comparisons", response_a=a["id"], response_b=b["id"], choice="b", strength="much better")
    assert r.status_code == 201
    convo = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": b["text"]},
             {"role": "user", "content": "And then?"}]
    second = chat_turn(ann, convo, prompt_id=first["prompt_id"])
    assert second["prompt_id"] == first["prompt_id"]
    c, d = second["candidates"]
    assert ann.submit("comparisons", response_a=a["id"], response_b=c["id"], choice="a",
                      strength="better").status_code == 422  # answers to different conversations
    assert ann.submit("comparisons", response_a=c["id"], response_b=d["id"], choice="tie",
                      strength="better").status_code == 201
    for messages in ([], [{"role": "assistant", "content": "hi"}], [{"role": "user"}], "hello",
                     [{"role": "robot", "content": "hi"}]):
        assert ann.post("/api/chat/turn", {"messages": messages}).status_code == 422, messages
    assert ann.post("/api/chat/turn", {"messages": convo, "prompt_id": 999}).status_code == 404
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.comparisons).order_by(schema.comparisons.c.id)).all()
        models = dict(conn.execute(sa.select(schema.responses.c.id, schema.responses.c.model)).all())
    assert [(r.choice, r.strength) for r in rows] == [("b", "much better"), ("tie", None)]
    assert rows[1].context == convo
    assert models[a["id"]] != models[b["id"]]  # two models served: two different ones answer each turn
    games = progress.comparison_games(str(client.app.state.db.url))
    assert [g[2] for g in games] == [0.0, 0.5]


def test_thumbs_queue_and_ratings(lab):
    client, people, engine = lab
    ann = people["ann"]
    assert ann.get("/api/queue/rating").json() == {"item": None}
    ann.submit("prompts", text="What is 2 + 2?")
    item = ann.get("/api/queue/rating").json()["item"]
    assert item["context"][0]["content"] == "What is 2 + 2?" and item["response"]["text"] is not None
    assert ann.submit("ratings", response_id=item["response_id"], thumbs="sideways").status_code == 422
    assert ann.submit("ratings", response_id=12345, thumbs="up").status_code == 404
    assert ann.submit("ratings", response_id=item["response_id"], thumbs="down", comment=SQL).status_code == 201
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.ratings)).one()
    assert (row.thumbs, row.comment, row.prompt_id) == (-1, SQL, 1)


def test_people_see_and_correct_only_their_own_records(lab):
    client, people, engine = lab
    ann, bob, ada = people["ann"], people["bob"], people["ada"]
    pid = ann.submit("prompts", text="ann's prompt").json()["id"]
    did = ann.submit("demonstrations", prompt_id=pid, text="ann's first try").json()["id"]
    assert ann.get(f"/api/records/demonstration/{did}").json()["text"] == "ann's first try"
    assert bob.get(f"/api/records/demonstration/{did}").status_code == 404  # as if it did not exist
    assert ada.get(f"/api/records/demonstration/{did}").status_code == 200  # admins may
    assert ann.get("/api/records/secrets/1").status_code == 404
    assert bob.get("/api/history").json()["demonstration"] == []
    assert bob.submit("demonstrations", prompt_id=pid, text="bob overwrites", supersedes=did).status_code == 403
    fixed = ann.submit("demonstrations", prompt_id=pid, text="ann's second try", supersedes=did)
    assert fixed.status_code == 201
    assert ann.submit("demonstrations", prompt_id=pid, text="again", supersedes=did).status_code == 409
    other = ann.submit("prompts", text="another").json()["id"]
    assert ann.submit("demonstrations", prompt_id=other, text="moved",
                      supersedes=fixed.json()["id"]).status_code == 422
    history = ann.get("/api/history").json()
    assert [d["text"] for d in history["demonstration"]] == ["ann's second try", "ann's first try"]
    assert history["demonstration"][0]["supersedes"] == did
    assert count(engine, schema.demonstrations) == 2
    assert bob.get("/api/admin/stats").status_code == 403 and bob.get("/admin").status_code == 403
    stats = ada.get("/api/admin/stats").json()
    assert stats["records"]["demonstration"] == {"ann": 1}  # the latest version only
    assert "ann" in ada.get("/admin").text


def test_typed_text_is_stored_verbatim_and_rendered_inert(lab):
    client, people, engine = lab
    ann = people["ann"]
    text = f"{XSS} and {SQL}"
    pid = ann.submit("prompts", text=text).json()["id"]
    ann.submit("demonstrations", prompt_id=pid, text=SQL)
    with engine.connect() as conn:
        assert conn.execute(sa.select(schema.prompts.c.text)).scalar_one() == text
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.users)).scalar_one() == 3
    bob = people["bob"]
    page = bob.get("/demonstrate")
    assert page.status_code == 200
    assert XSS not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "&#39;; DROP TABLE users; --" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]  # inline script could not run anyway
    history = ann.get("/history").text
    assert XSS not in history and "&lt;script&gt;" in history
    for url in ("/rank", "/rate"):  # responses to the prompt show it as context
        assert XSS not in bob.get(url).text
    assert json.loads(ann.get("/api/history").text)["prompt"][0]["text"] == text


def test_every_page_renders(lab):
    client, people, engine = lab
    ann = people["ann"]
    ann.submit("prompts", text="A prompt for every page.")
    for url, marker in [("/", "Hello, ann"), ("/prompt", 'name="text"'), ("/demonstrate", 'name="prompt_id"'),
                        ("/rank", 'id="rank-list"'), ("/chat", 'id="chat-form"'), ("/rate", 'value="up"'),
                        ("/history", "My history"), ("/static/app.js", "setupRanking"),
                        ("/static/app.css", "body")]:
        r = ann.get(url)
        assert r.status_code == 200 and marker in r.text, url
        assert r.headers["x-frame-options"] == "DENY"
    assert ann.get("/static/nothing.js").status_code == 404
    saved = ann.get("/prompt?saved=prompt").text
    assert "Saved your prompt" in saved
