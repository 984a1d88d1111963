"""What a command-line source names, parsed once into a typed `Source`, so that every command takes the same forms
and a bad one fails before any work, naming its option:

- data:    a file (.jsonl, .json, .parquet, .csv or a `save_to_disk` directory), `sample:NAME` (a bundled sample)
           or `sim:SPLIT` (the prompts of a split of the built-in task); `io.read_rows` reads them
- scorers: `rm:DIR` (a reward model), `module:function` or `path/to/file.py:function` (a reward function), `sim`
           (the built-in task's gold score), `db:FILE` (people's A/B comparisons in a labelling database)
- eval's entries: a model, or `responses:FILE` (responses written already)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rlhfkit import UsageError

PREFIXES = {"sample:": "sample", "sim:": "sim", "rm:": "rm", "db:": "db", "responses:": "responses"}
FORMS = {"file": "a data file", "sample": "sample:NAME", "sim": "sim:SPLIT", "rm": "rm:DIR",
         "fn": "module:function", "gold": "sim", "db": "db:FILE", "responses": "responses:FILE", "model": "a model"}
DATA = ("sample", "sim", "file")


class Source(NamedTuple):
    """kind: one of FORMS' keys; value: what follows the prefix (the whole spec for a file, function or model)."""

    kind: str
    value: str


def parse(spec: str, option: str, kinds: Sequence[str]) -> Source:
    """`spec` as one of `kinds` (FORMS' keys), or a UsageError naming `option` and the forms it takes."""
    for prefix, kind in PREFIXES.items():
        if spec.startswith(prefix) and kind in kinds:
            return Source(kind, spec[len(prefix):])
    if spec == "sim" and "gold" in kinds:
        return Source("gold", "")
    if ":" in spec and "fn" in kinds and not spec.startswith(tuple(PREFIXES)):
        return Source("fn", spec)
    for kind in ("file", "model"):
        if kind in kinds and not spec.startswith(tuple(PREFIXES)):
            return Source(kind, spec)
    raise UsageError(f"{option} {spec!r}: expected {' or '.join(FORMS[k] for k in kinds)}")
