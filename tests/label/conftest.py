"""Fixtures for the labelling app: a database with people in it, the app over it, clients signed in as them, and
a real server in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two different tiny models (tiny-llama and a copy with other random weights), so A/B turns compare
    models; 8 new tokens at most."""
    from rlhfkit import models
    from rlhfkit.label.served import Models

    other = tmp_path_factory.mktemp("models") / "tiny-other"
    tok = models.load_tokenizer("tiny-llama")
    models.save_pretrained(models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok), tok, other)
    return Models(["tiny-llama", str(other)], batch_size=4)


@pytest.fixture
def generation():
    from rlhfkit.label.served import Generation

    return Generation(temperature=1.0, top_p=1.0, max_new_tokens=8, rank_k=4)


class Person:
    """A signed-in labeller talking to the JSON API with a bearer token."""

    def __init__(self, client, name: str, token: str):
        self.client, self.name, self.token = client, name, token
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, url, **kw):
        return self.client.get(url, headers=self.headers, **kw)

    def post(self, url, body=None, **kw):
        return self.client.post(url, json=body, headers=self.headers, **kw)

    def submit(self, endpoint: str, **fields):
        return self.post(f"/api/{endpoint}", {"submission_id": str(uuid.uuid4()), **fields})


@pytest.fixture
def lab(tmp_path, tiny_models, generation):
    """The app over a fresh database, with labellers ann and bob and admin ada: (client, people, engine)."""
    from starlette.testclient import TestClient

    from rlhfkit.feedback import store
    from rlhfkit.label import server

    db = str(tmp_path / "label.sqlite")
    app = server.create_app(db, tiny_models, generation, max_body_bytes=16 * 1024)
    engine = app.state.db
    tokens = {name: store.add_user(engine, name, admin=(name == "ada")) for name in ("ann", "bob", "ada")}
    with TestClient(app) as client:
        yield client, {n: Person(client, n, t) for n, t in tokens.items()}, engine


def count(engine, table) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, *options: str) -> subprocess.Popen:
    """`rlhfkit label serve --db DB --port PORT OPTIONS…`, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "label", "serve", "--db", db, "--port", str(port),
                             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=1).status_code == 401:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start within 60 s")
