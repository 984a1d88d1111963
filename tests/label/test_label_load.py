"""A real server on loopback: 20 labellers × 50 submissions at once lose and duplicate nothing; a server killed
with SIGKILL in the middle of a burst still holds, after a restart, every submission it acknowledged; and
retrying the unacknowledged ones with their ids stores each once."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from rlhfkit.feedback import schema, store
from tests.label.conftest import free_port, start_server

PEOPLE, EACH = 20, 50


class Labeller(threading.Thread):
    """Submits prompts and demonstrations of them; remembers what the server acknowledged (201)."""

    def __init__(self, port: int, token: str, n: int, tag: str):
        super().__init__(daemon=True)
        self.url, self.headers, self.n, self.tag = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, \
            n, tag
        self.acked: dict[str, str] = {}  # submission id -> text
        self.unacked: list[tuple[str, str, dict]] = []  # (submission id, endpoint, body) without an answer
        self.replay_status = None

    def run(self):
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=20) as client:
            prompt_id = None
            for i in range(self.n):
                sid, text = str(uuid.uuid4()), f"{self.tag} {i} by {self.name}"
                endpoint, body = (("prompts", {"text": text}) if prompt_id is None or i % 2 == 0 else
                                  ("demonstrations", {"prompt_id": prompt_id, "text": text}))
                body["submission_id"] = sid
                try:
                    r = client.post(f"/api/{endpoint}", json=body)
                except httpx.TransportError:  # the server went away: this one is unacknowledged; stop
                    self.unacked.append((sid, endpoint, body))
                    return
                assert r.status_code == 201, r.text
                self.acked[sid] = text
                if endpoint == "prompts":
                    prompt_id = r.json()["id"]
            first = next(iter(self.acked))
            r = client.post("/api/prompts", json={"submission_id": first, "text": "replayed"})
            self.replay_status = r.status_code


def stored(db: str) -> dict[str, str]:
    """submission id -> text of every prompt and demonstration in the database."""
    engine = store.open_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.prompts.c.submission_id, schema.prompts.c.text)).all()
        rows += conn.execute(sa.select(schema.demonstrations.c.submission_id, schema.demonstrations.c.text)).all()
        n_submissions = conn.execute(sa.select(sa.func.count()).select_from(schema.submissions)).scalar_one()
    engine.dispose()
    assert n_submissions == len(rows)
    return dict(rows)


def run_all(threads, timeout=120):
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a labeller thread hung"


@pytest.mark.slow  # the default run keeps the store's and the HTTP API's own tests
def test_concurrent_labellers_and_sigkill(tmp_path):
    db = str(tmp_path / "load.sqlite")
    engine = store.open_engine(db)
    tokens = [store.add_user(engine, f"labeller{i:02d}") for i in range(PEOPLE)]
    engine.dispose()
    port = free_port()
    server = start_server(db, port)
    try:
        # 1. 20 people × 50 submissions at once, each replaying one at the end
        people = [Labeller(port, tok, EACH, "burst") for tok in tokens]
        run_all(people)
        acked = {sid: text for p in people for sid, text in p.acked.items()}
        assert len(acked) == PEOPLE * EACH and all(p.replay_status == 409 for p in people)
        assert stored(db) == acked  # nothing lost, nothing twice, nothing changed
        # 2. another burst, killed without warning once some of it has been acknowledged
        people = [Labeller(port, tok, EACH, "killed") for tok in tokens]
        for p in people:
            p.start()
        deadline = time.monotonic() + 60
        while sum(len(p.acked) for p in people) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        for p in people:
            p.join(60)
        second = {sid: text for p in people for sid, text in p.acked.items()}
        assert 100 <= len(second) < PEOPLE * EACH, "the kill did not land mid-burst"
        # 3. after a restart every acknowledged submission is there
        server = start_server(db, port)
        after = stored(db)
        assert all(after.get(sid) == text for sid, text in {**acked, **second}.items())
        # 4. retrying what got no answer stores each once (201), or finds it already stored (409)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            for p in people:
                for sid, endpoint, body in p.unacked:
                    r = client.post(f"/api/{endpoint}", json=body, headers=p.headers)
                    assert r.status_code in (201, 409), r.text
                    r = client.post(f"/api/{endpoint}", json=body, headers=p.headers)
                    assert r.status_code == 409
        final = stored(db)
        retried = {sid for p in people for sid, _, _ in p.unacked}
        assert set(final) == set(acked) | set(second) | retried
    finally:
        server.kill()
        server.wait(10)
