"""Detect the data formats of SPEC §3 by their columns and convert rows to canonical records.

Canonical records are message lists (`[{"role": ..., "content": ...}]`), so every format goes through the
model's chat template the same way:
- `Conversation`: the messages of one SFT example (every assistant turn is trained).
- `Preference`: a prompt, K responses and the comparison pairs a ranking implies (pairs are K=2).
- `Prompt`: the messages up to and including the last user turn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhfkit import DataError
from rlhfkit.core.losses import ranking_pairs
from rlhfkit.data.io import Row, read_rows

T = TypeVar("T")

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")

# format name -> the columns that identify it, tried in this order (the most specific first)
FORMATS: dict[str, tuple[str, ...]] = {
    "rankings": ("prompt", "responses", "ranking"),
    "pairs": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "conversations": ("messages",),
    "hh_text": ("text",),
    "prompts": ("prompt",),
}
PROMPT_LIKE = ("prompts", "conversations")


def read(path: str, convert: Callable[[Row, str], T], fmt: str | None = None) -> tuple[list[T], list[Row]]:
    """The rows of a data source (`io.read_rows`: a file, sample:NAME or sim:SPLIT), each converted by `convert`
    (`to_conversation`, `to_prompt` or `to_preference`) from its format, detected from the columns unless `fmt`
    names it; and the rows themselves (their own columns, where they came from)."""
    rows = read_rows(path)
    fmt = detect_format(rows, fmt)
    return [convert(r, fmt) for r in rows], rows


def detect_format(rows: list[Row], override: str | None = None) -> str:
    """The format of a file, from the columns of its first row (or `--format`); every row must have them."""
    if override:
        if override not in FORMATS:
            raise DataError(f"unknown --format {override!r}; valid: {', '.join(FORMATS)}")
        fmt = override
    else:
        keys = set(rows[0].data)
        found = next((name for name, cols in FORMATS.items() if set(cols) <= keys), None)
        if found is None:
            raise DataError(f"{rows[0].where}: cannot tell the data format from the columns {sorted(keys)}; "
                            f"expected one of: " + "; ".join(f"{n} ({', '.join(c)})" for n, c in FORMATS.items()))
        fmt = found
    for row in rows:
        if fmt in PROMPT_LIKE and any(k in row.data for k in ("prompt", "messages")):
            continue  # prompt files may mix {"prompt"} and {"messages"} rows (SPEC §3)
        missing = [c for c in FORMATS[fmt] if c not in row.data]
        if missing:
            raise DataError(f"{row.where}: missing column(s) {', '.join(missing)} for the {fmt} format")
    return fmt


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    where: str


@dataclass(frozen=True)
class Preference:
    """One prompt with K ≥ 2 responses; `pairs` are (winner, loser) indices into `responses` (ties give none)."""

    prompt: Messages
    responses: list[Messages]
    pairs: list[tuple[int, int]]
    margin: float | None
    where: str


@dataclass(frozen=True)
class Prompt:
    messages: Messages
    where: str


def _messages(value: Any, where: str, what: str) -> Messages:
    """A message list from a list of {role, content} dicts (validated) or a plain string (one user turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {what} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {what}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {what}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {what}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _response(value: Any, where: str, what: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, where, what)
    if any(m["role"] != "assistant" for m in msgs):
        raise DataError(f"{where}: {what} may only hold assistant messages")
    return msgs


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text: str, where: str) -> Messages:
    """An Anthropic HH transcript ("\\n\\nHuman: …\\n\\nAssistant: …") as a message list."""
    if not isinstance(text, str):
        raise DataError(f"{where}: an HH transcript must be a string")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_hh_pair(row: Row) -> tuple[Messages, Messages, Messages]:
    """HH chosen/rejected: the shared prefix up to the last "\\n\\nAssistant:" is the prompt."""
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{row.where}: HH chosen and rejected must be strings")
    cut = chosen.rfind("\n\nAssistant:")
    if cut < 0:
        raise DataError(f"{row.where}: chosen has no '\\n\\nAssistant:' turn")
    prefix = chosen[:cut + len("\n\nAssistant:")]
    if not rejected.startswith(prefix):
        raise DataError(f"{row.where}: chosen and rejected do not share the prompt up to the last "
                        "'\\n\\nAssistant:'")
    prompt = parse_hh(chosen[:cut], row.where)
    as_reply = lambda s: [{"role": "assistant", "content": s.strip()}]  # noqa: E731
    return prompt, as_reply(chosen[len(prefix):]), as_reply(rejected[len(prefix):])


def checked_ranking_pairs(ranking: Any, k: int, where: str) -> list[tuple[int, int]]:
    """Validate a best-first ranking of `k` responses (items are indices or lists of tied indices), then pair it."""
    if not isinstance(ranking, list) or not ranking:
        raise DataError(f"{where}: ranking must be a non-empty list")
    flat = [i for item in ranking for i in (item if isinstance(item, list) else [item])]
    for i in flat:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < k:
            raise DataError(f"{where}: ranking index {i!r} is out of range for {k} responses")
    if len(set(flat)) != len(flat):
        raise DataError(f"{where}: ranking repeats an index: {ranking}")
    if len(flat) != k:
        raise DataError(f"{where}: ranking names {len(flat)} of {k} responses; rank all of them")
    return ranking_pairs(ranking)


def to_preference(row: Row, fmt: str) -> Preference:
    d, where = row.data, row.where
    margin = d.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DataError(f"{where}: margin must be a finite number, got {margin!r}")
    if fmt == "hh":
        prompt, chosen, rejected = _split_hh_pair(row)
        return Preference(prompt, [chosen, rejected], [(0, 1)], margin, where)
    if fmt == "pairs":
        prompt = _messages(d["prompt"], where, "prompt")
        return Preference(prompt, [_response(d["chosen"], where, "chosen"), _response(d["rejected"], where, "rejected")],
                          [(0, 1)], margin, where)
    if fmt == "rankings":
        prompt = _messages(d["prompt"], where, "prompt")
        responses = d["responses"]
        if not isinstance(responses, list) or not 2 <= len(responses) <= 9:
            raise DataError(f"{where}: responses must be a list of 2 to 9 responses")
        resp = [_response(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        return Preference(prompt, resp, checked_ranking_pairs(d["ranking"], len(resp), where), margin, where)
    raise DataError(f"{where}: the {fmt} format holds no comparisons (need pairs, rankings or HH chosen/rejected)")


def to_conversation(row: Row, fmt: str) -> Conversation:
    """SFT view of any format. Comparison formats contribute their best response."""
    d, where = row.data, row.where
    if fmt == "conversations":
        if "messages" not in d:
            raise DataError(f"{where}: missing column messages for the conversations format")
        msgs = _messages(d["messages"], where, "messages")
    elif fmt == "prompt_completion":
        msgs = _messages(d["prompt"], where, "prompt") + _response(d["completion"], where, "completion")
    elif fmt == "alpaca":
        if not isinstance(d["instruction"], str) or not isinstance(d["output"], str):
            raise DataError(f"{where}: instruction and output must be strings")
        extra = d.get("input") or ""
        user = d["instruction"] + (f"\n\n{extra}" if extra else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]
    elif fmt == "hh_text":
        msgs = parse_hh(d["text"], where)
    elif fmt in ("hh", "pairs", "rankings"):
        pref = to_preference(row, fmt)
        best = pref.pairs[0][0] if pref.pairs else 0
        msgs = pref.prompt + pref.responses[best]
    else:
        raise DataError(f"{where}: the {fmt} format has no responses to train on")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return Conversation(msgs, where)


def to_prompt(row: Row, fmt: str) -> Prompt:
    d, where = row.data, row.where
    if fmt in PROMPT_LIKE:
        fmt = "conversations" if "messages" in d else "prompts"
    if fmt == "conversations":
        msgs = _messages(d["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
    elif fmt in ("hh", "pairs", "rankings"):
        msgs = to_preference(row, fmt).prompt
    elif fmt == "alpaca":
        msgs = to_conversation(row, fmt).messages[:-1]
    elif fmt == "hh_text":
        msgs = parse_hh(d["text"], where)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
    else:
        msgs = _messages(d["prompt"], where, "prompt")
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(f"{where}: a prompt must end with a user turn")
    if not any(m["content"].strip() for m in msgs):
        raise DataError(f"{where}: the prompt is empty")
    return Prompt(msgs, where)
