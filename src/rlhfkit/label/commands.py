"""`rlhfkit label serve | users add | users revoke | export`: configs (field docstrings are the --help) and entry
points."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Literal

from rlhfkit import RlhfkitError, UsageError
from rlhfkit.config import parse_args
from rlhfkit.rollout import EngineConfig
from rlhfkit.tracking import check_output


@dataclass
class ServeConfig(EngineConfig):
    """rlhfkit label serve: the human-feedback web app (prompts, demonstrations, rankings, chat A/B, thumbs)."""

    db: str = "label.sqlite"
    """Database: a path to an SQLite file (created if missing) or any SQLAlchemy URL."""
    model: list[str] = field(default_factory=list)
    """Models that answer (alias, HF directory, .gguf or hub id); repeat --model or list several. None: the
    pages that need generated responses say so, the others work."""
    host: str = "127.0.0.1"
    """Address to bind; the default lets only this machine in. To serve colleagues, put a TLS reverse proxy on
    this machine in front of it (docs/label.md) and pass --behind-https."""
    port: int = 8000
    """Port to listen on."""
    behind_https: bool = False
    """A TLS reverse proxy serves the app: mark the session cookie Secure, so browsers send it over https only."""
    session_hours: float = 12.0
    """A sign-in lasts this long; then the person signs in again with their token (bearer tokens do not expire)."""
    temperature: float = 1.0
    """Sampling temperature of the served models."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest response in tokens."""
    rank_k: int = 4
    """Responses per ranking task (2 to 9)."""
    batch_size: int = 8
    """Rows per forward pass when sampling."""
    max_body_kb: int = 64
    """Largest request body accepted, in KiB (413 above it)."""


@dataclass
class UsersAddConfig:
    """rlhfkit label users add: create a labeller (or admin) and print their sign-in token (shown only once)."""

    db: str = "label.sqlite"
    """Database: a path to an SQLite file or any SQLAlchemy URL."""
    name: str = ""
    """The person's name, unique; shown to admins next to their records."""
    admin: bool = False
    """Admins also see everyone's progress and the agreement between labellers."""


@dataclass
class UsersRevokeConfig:
    """rlhfkit label users revoke: cut a person off at once (their token and every open session stop working); their
    records stay and are still exported. `users add` with the same name later reinstates them under a new token."""

    db: str = "label.sqlite"
    """Database: a path to an SQLite file or any SQLAlchemy URL."""
    name: str = ""
    """The person's name, as given to `users add`."""


@dataclass
class ExportConfig:
    """rlhfkit label export: training data from collected feedback, split train/validation by person."""

    db: str = "label.sqlite"
    """Database: a path to an SQLite file or any SQLAlchemy URL."""
    kind: Literal["sft", "pairs", "rankings", "thumbs"] = "pairs"
    """sft: demonstrations as conversations; pairs: A/B comparisons; rankings: K-way rankings; thumbs: pairs of an
    answer rated up over one to the same conversation rated down."""
    output: str = "label_export"
    """Directory for train.jsonl, validation.jsonl and export.json."""
    split_by: Literal["labeller", "prompt_author"] = "labeller"
    """Keep each person's records (labeller) or everything about each person's prompts (prompt_author) on one side."""
    val_fraction: float = 0.2
    """Share of the records that go to validation (whole people at a time; 0: everything in train)."""
    seed: int = 0
    """Seed of the shuffle that picks the validation people."""


def _web():
    try:
        from rlhfkit.feedback import export, store
        from rlhfkit.label import server
    except ImportError as e:
        raise UsageError(f"the labelling app needs the web extra ({e.name} is missing): "
                         "pip install 'rlhfkit[web]'") from None
    return server, store, export


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    server, store, _ = _web()
    if not 2 <= cfg.rank_k <= 9:
        raise UsageError(f"--rank-k must be between 2 and 9, got {cfg.rank_k}")
    models = server.Models(cfg.model, cfg.batch_size, cfg)
    generation = server.Generation(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.rank_k)
    app = server.create_app(cfg.db, models, generation, cfg.max_body_kb * 1024, cfg.session_hours, cfg.behind_https)
    print(f"rlhfkit label: serving {store.db_url(cfg.db)} on http://{cfg.host}:{cfg.port} "
          f"(models: {', '.join(cfg.model) or 'none'}; sign-ins last {cfg.session_hours:g} h"
          f"{'; Secure cookies for a TLS proxy' if cfg.behind_https else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


def users_add(cfg: UsersAddConfig) -> None:
    _, store, _ = _web()
    try:
        engine = store.open_engine(cfg.db)
        revoked = store.revoked_at(engine, cfg.name)
        token = store.add_user(engine, cfg.name, cfg.admin)
    except store.StoreError as e:
        raise RlhfkitError(str(e)) from None
    when = revoked[:16].replace("T", " ") + " UTC" if revoked else ""
    done = f"reinstated (revoked {when}; their earlier records are theirs again)" if revoked else "added"
    print(f"{'admin' if cfg.admin else 'labeller'} {cfg.name!r} {done}; their sign-in token (shown only now):",
          file=sys.stderr)
    print(token)


def users_revoke(cfg: UsersRevokeConfig) -> None:
    _, store, _ = _web()
    try:
        ended = store.revoke_user(store.open_engine(cfg.db, create=False), cfg.name)
    except store.StoreError as e:
        raise RlhfkitError(str(e)) from None
    print(f"{cfg.name!r} revoked: their token and {ended} open session(s) no longer work; their records are kept",
          file=sys.stderr)


def export(cfg: ExportConfig) -> None:
    _, _, exporter = _web()
    if not 0 <= cfg.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    check_output(cfg.output, directory=True)
    try:
        print(json.dumps(exporter.export(cfg.db, cfg.kind, cfg.output, cfg.split_by, cfg.val_fraction, cfg.seed)))
    except exporter.store.StoreError as e:
        raise RlhfkitError(str(e)) from None


def repeated_as_list(argv: list[str], key: str) -> list[str]:
    """`--model A --model B` -> `--model A B` (the config parser keeps the last of repeated options)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == f"--{key}":
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                values.append(argv[i])
        elif argv[i].startswith(f"--{key}="):
            values.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    return rest + ([f"--{key}", *values] if values else [])


COMMANDS = {"serve": (ServeConfig, serve), "users add": (UsersAddConfig, users_add),
            "users revoke": (UsersRevokeConfig, users_revoke), "export": (ExportConfig, export)}


def main(command: str, argv: list[str]) -> None:
    cls, run = COMMANDS[command]
    if cls is ServeConfig:
        argv = repeated_as_list(argv, "model")
    if command.startswith("users ") and argv and not argv[0].startswith("-"):
        argv = ["--name", *argv]  # `users revoke ann` reads as `users revoke --name ann`
    cfg = parse_args(cls, argv, f"rlhfkit label {command}")
    if command.startswith("users ") and not cfg.name.strip():
        raise UsageError("--name is required")
    run(cfg)
