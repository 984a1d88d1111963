"""Access for a team over weeks, through the real app and database: a sign-in expires after its lifetime (401,
as for a cookie never issued), `label users revoke` cuts a person off at once while their records stay in the
export, and `serve --behind-https` marks the session cookie Secure."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
from starlette.testclient import TestClient

from rlhfkit.feedback import schema, store
from rlhfkit.label import server
from tests.conftest import run_cli
from tests.label.conftest import count, free_port, start_server


def sign_in(client, token: str) -> set[str]:
    """Sign in at /login; returns the session cookie's attributes, lower-cased ("httponly", "max-age=3600" …)."""
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return {part.strip().lower() for part in r.headers["set-cookie"].split(";")[1:]}


def csrf_of(client) -> str:
    return client.get("/").text.split('name="csrf" content="')[1].split('"')[0]


@contextmanager
def serving(db: str, *options: str):
    """`rlhfkit label serve` in its own process, as a team runs it; yields its URL."""
    port = free_port()
    proc = start_server(db, port, *options)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def age_sessions(engine, hours: float) -> None:
    """Every session in the database now looks signed in `hours` ago."""
    then = (datetime.now(timezone.utc) - timedelta(hours=hours)).isoformat(timespec="microseconds")
    with engine.begin() as conn:
        conn.execute(schema.sessions.update().values(created=then))


def test_a_session_expires_after_its_lifetime(tmp_path):
    app = server.create_app(str(tmp_path / "l.sqlite"), session_hours=2)
    engine = app.state.db
    token = store.add_user(engine, "ann")
    with TestClient(app) as client:
        assert "max-age=7200" in sign_in(client, token)  # the browser forgets it when the server does
        age_sessions(engine, 1.9)
        assert client.get("/api/me").json()["name"] == "ann"
        age_sessions(engine, 2.1)
        expired = client.get("/api/me"), client.get("/history")
        client.cookies.clear()
        client.cookies.set(server.COOKIE, "never-issued")
        unknown = client.get("/api/me"), client.get("/history")
        assert [r.status_code for r in expired] == [r.status_code for r in unknown] == [401, 401]
        assert expired[0].json() == unknown[0].json() and expired[1].text == unknown[1].text  # no tell-tale
        assert 'name="token"' in expired[1].text  # the page is the sign-in form
        assert client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        client.cookies.clear()
        sign_in(client, token)  # signing in again works, and clears the expired session out of the table
        assert client.get("/api/me").status_code == 200 and count(engine, schema.sessions) == 1


def test_revoke_cuts_off_token_and_open_session_at_once_and_keeps_records(tmp_path):
    db = str(tmp_path / "l.sqlite")
    app = server.create_app(db)
    engine = app.state.db
    token, bob = store.add_user(engine, "ann"), store.add_user(engine, "bob")
    bearer = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as api, TestClient(app) as browser:
        r = api.post("/api/prompts", json={"submission_id": str(uuid.uuid4()), "text": "Why?"}, headers=bearer)
        r = api.post("/api/demonstrations", headers=bearer, json={
            "submission_id": str(uuid.uuid4()), "prompt_id": r.json()["id"], "text": "Because."})
        assert r.status_code == 201
        sign_in(browser, token)
        csrf = csrf_of(browser)
        assert browser.get("/api/me").status_code == 200
        # the admin revokes ann from another process while her browser session is open
        proc = run_cli("label", "users", "revoke", "ann", "--db", db)
        assert "1 open session(s) no longer work" in proc.stderr
        assert api.get("/api/me", headers=bearer).status_code == 401
        assert browser.get("/api/me").status_code == 401 and browser.get("/").status_code == 401
        r = browser.post("/api/prompts", json={"submission_id": str(uuid.uuid4()), "text": "after"},
                         headers={"X-CSRF-Token": csrf})
        assert r.status_code == 401 and count(engine, schema.prompts) == 1
        assert browser.post("/login", data={"token": token}).status_code == 401  # no new session either
        assert api.get("/api/me", headers={"Authorization": f"Bearer {bob}"}).status_code == 200
        # her records stay and are exported under her name
        out = tmp_path / "sft"
        run_cli("label", "export", "--db", db, "--kind", "sft", "--output", str(out), "--val-fraction", "0")
        rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
        assert [(r["labeller"], r["messages"][1]["content"]) for r in rows] == [("ann", "Because.")]
        # adding her again reinstates her under a new token; the old one stays dead
        proc = run_cli("label", "users", "add", "--db", db, "--name", "ann")
        new = proc.stdout.strip()
        assert "reinstated" in proc.stderr and new != token
        assert api.get("/api/me", headers=bearer).status_code == 401
        history = api.get("/api/history", headers={"Authorization": f"Bearer {new}"}).json()
        assert [p["text"] for p in history["prompt"]] == ["Why?"]


def test_secure_cookie_only_behind_https(tmp_path):
    db = str(tmp_path / "l.sqlite")
    engine = store.open_engine(db)
    token = store.add_user(engine, "ann")
    engine.dispose()
    with serving(db) as plain, serving(db, "--behind-https", "--session-hours", "0.5") as tls:
        with httpx.Client(base_url=plain) as a, httpx.Client(base_url=tls) as b:
            without, behind = sign_in(a, token), sign_in(b, token)
    assert "secure" not in without and {"httponly", "samesite=strict", "max-age=43200"} <= without
    assert {"secure", "httponly", "samesite=strict", "max-age=1800"} <= behind
