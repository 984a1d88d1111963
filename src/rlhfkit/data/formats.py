"""Detect the data formats of SPEC §3 by their columns and convert rows to canonical records.

Canonical records are message lists (`[{"role": ..., "content": ...}]`, parsed by `messages`), so every format
goes through the model's chat template the same way:
- `Conversation`: the messages of one SFT example (every assistant turn is trained), or a plain text, trained
  whole without the template.
- `Preference`: a prompt, K responses and the comparison pairs a ranking or scores imply (pairs are K=2).
- `Prompt`: the messages up to and including the last user turn.
`read` converts every row of a data source and stops at the first bad one (file:line), unless it is given a
`Skipped`, which counts the rows left out and keeps the first few errors for the log and run.json.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from rlhfkit import DataError, UsageError
from rlhfkit.core.losses import ranking_pairs
from rlhfkit.data.io import Row, read_rows
from rlhfkit.data.messages import (ROLES, Messages, as_messages, as_response, as_tools, looks_like_hh, oasst_rankings,
                                   parse_hh, sharegpt, score_pairs, split_conversations, split_hh_pair)

__all__ = ["ROLES", "Messages", "parse_hh"]  # re-exported: callers name them as formats.*

T = TypeVar("T")

# format name -> the columns that identify it, tried in this order (the most specific first within each kind)
FORMATS: dict[str, tuple[str, ...]] = {
    "rankings": ("prompt", "responses", "ranking"),
    "scored": ("prompt", "responses", "scores"),
    "scored_completions": ("prompt", "completions"),
    "pairs": ("prompt", "chosen", "rejected"),
    "sharegpt_pairs": ("conversations", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "implicit_pairs": ("chosen", "rejected"),
    "oasst_trees": ("message_tree_id", "prompt"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "conversations": ("messages",),
    "sharegpt": ("conversations",),
    "hh_text": ("text",),
    "text": ("text",),
    "prompts": ("prompt",),
}
# formats with the same columns, told apart by the first row's values
SHAPES: dict[str, Callable[[dict], bool]] = {
    "hh": lambda d: isinstance(d["chosen"], str),
    "implicit_pairs": lambda d: not isinstance(d["chosen"], str),
    "hh_text": lambda d: looks_like_hh(d["text"]),
    "text": lambda d: not looks_like_hh(d["text"]),
}
# Formats of one kind are alternatives: two that both fit a row (and neither's columns hold the other's) make it
# ambiguous. Across kinds the earlier kind wins: comparisons hold their demonstrations, and a structured format wins
# over a plain `text` column (Alpaca files often carry a rendered one).
KINDS = {"comparisons": ("rankings", "scored", "scored_completions", "pairs", "sharegpt_pairs", "hh", "implicit_pairs",
                         "oasst_trees"),
         "demonstrations": ("prompt_completion", "prompt_response", "alpaca", "conversations", "sharegpt"),
         "text": ("hh_text", "text")}
COMPARISONS = KINDS["comparisons"]
PROMPT_LIKE = ("prompts", "conversations")
MAX_RESPONSES = 9


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    where: str
    text: str | None = None  # plain text (the `text` format): trained whole, without the chat template
    tools: list[dict] | None = None  # function schemas the template renders (a `tools` column)


@dataclass(frozen=True)
class Preference:
    """One prompt with K ≥ 2 responses; `pairs` are (winner, loser) indices into `responses` (ties give none)."""

    prompt: Messages
    responses: list[Messages]
    pairs: list[tuple[int, int]]
    margin: float | None
    where: str
    below_score_gap: int = 0  # pairs of scored responses dropped by `min_score_gap`


@dataclass(frozen=True)
class Prompt:
    messages: Messages
    where: str


@dataclass
class Skipped:
    """Rows left out by --skip-invalid: how many, and the errors of the first few (`file:line: why`)."""

    SHOWN: ClassVar[int] = 5

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(str(error))

    def as_dict(self) -> dict[str, Any]:
        """For run.json's data section."""
        return {"data/skipped_invalid": self.count, "data/skipped_invalid_first": self.first}

    def line(self) -> str:
        """For the log."""
        if not self.count:
            return "data: no invalid rows (--skip-invalid)"
        return f"data: {self.count} invalid rows skipped (--skip-invalid); the first: " + " | ".join(self.first)


def read(path: str, convert: Callable[[Row, str], T], fmt: str | None = None, skipped: Skipped | None = None,
         columns: list[str] | None = None) -> tuple[list[T], list[Row]]:
    """The rows of a data source (`io.read_rows`: a file, sample:NAME or sim:SPLIT), each converted by `convert`
    (`to_conversation`, `to_prompt` or `to_preference`) from its format, detected from the columns unless `fmt`
    names it; and the rows themselves (their own columns, where they came from). A bad row stops with its
    file:line, or, given `skipped`, is left out and counted there. `columns` renames the file's columns
    (`rename_columns`) before anything else."""
    return convert_rows(rename_columns(read_rows(path), columns), convert, fmt, skipped, str(path))


def rename_columns(rows: list[Row], columns: list[str] | None) -> list[Row]:
    """`rows` with their columns renamed by `columns`, entries FILE=OURS (`--columns rating=scores answers=responses`):
    a file's own names for a format's columns. The keys of the objects in a `completions` list are renamed too
    (`--columns fine-grained_score=overall_score`)."""
    if not columns:
        return rows
    names: dict[str, str] = {}
    for entry in columns:
        theirs, eq, ours = entry.partition("=")
        if not eq or not theirs or not ours:
            raise UsageError(f"--columns {entry!r}: expected FILE_COLUMN=RLHFKIT_COLUMN, e.g. rating=scores")
        names[theirs] = ours

    def renamed(d: dict, where: str) -> dict:
        out = {names.get(k, k): v for k, v in d.items()}
        if len(out) < len(d):
            raise DataError(f"{where}: --columns {' '.join(columns)} gives two of the columns {sorted(d)} one name")
        return out

    out = []
    for row in rows:
        d = renamed(row.data, row.where)
        if isinstance(d.get("completions"), list):
            d["completions"] = [renamed(c, row.where) if isinstance(c, dict) else c for c in d["completions"]]
        out.append(Row(d, row.where))
    return out


def convert_rows(rows: list[Row], convert: Callable[[Row, str], T], fmt: str | None = None,
                 skipped: Skipped | None = None, source: str = "the data") -> tuple[list[T], list[Row]]:
    """`read` on rows read already (`source` names them in the error when every row is invalid)."""
    fmt = format_of(rows[0], fmt)
    before = skipped.count if skipped else 0
    if fmt == "oasst_trees":
        rows, fmt = tree_rankings(rows, skipped, source), "rankings"
    out, kept = [], []
    for row in rows:
        try:
            check_columns(row, fmt)
            out.append(convert(row, fmt))
        except DataError as e:
            if skipped is None:
                raise
            skipped.add(e)
            continue
        kept.append(row)
    if not out and skipped is not None and skipped.count > before:
        raise DataError(f"{source}: no valid rows ({skipped.count - before} skipped as invalid; the first: "
                        f"{skipped.first[0] if skipped.first else '?'})")
    if not out:  # every row was valid, and none gave a record (OpenAssistant trees without a ranking)
        raise DataError(f"{source}: no rows to train on")
    return out, kept


def tree_rankings(rows: list[Row], skipped: Skipped | None, source: str) -> list[Row]:
    """OpenAssistant trees as `rankings` rows, one per ranked set of replies (`messages.oasst_rankings`). A tree
    that holds no ranking (a single reply, or none ranked) gives none; how many gave none is printed, not hidden."""
    out, empty = [], 0
    for row in rows:
        try:
            check_columns(row, "oasst_trees")
            found = [Row(d, where) for d, where in oasst_rankings(row.data["prompt"], row.where)]
        except DataError as e:
            if skipped is None:
                raise
            skipped.add(e)
            continue
        empty += not found
        out += found
    if empty and int(os.environ.get("RANK", "0")) == 0:
        print(f"data: {source}: {empty} of {len(rows)} OpenAssistant trees hold no ranking (no message with two "
              "ranked assistant replies) and give no rows", file=sys.stderr)
    return out


def detect_format(rows: list[Row], override: str | None = None) -> str:
    """The format of a file, from the columns of its first row (or `--format`); every row must have them."""
    fmt = format_of(rows[0], override)
    for row in rows:
        check_columns(row, fmt)
    return fmt


def format_of(row: Row, override: str | None = None) -> str:
    """The format `override` names (checked), or the one the row's columns (and, where formats share columns, its
    values) identify; an error naming the formats when two of one kind fit."""
    if override:
        if override not in FORMATS:
            raise DataError(f"unknown --format {override!r}; valid: {', '.join(FORMATS)}")
        return override
    keys = set(row.data)
    fits = [name for name, cols in FORMATS.items()
            if set(cols) <= keys and (name not in SHAPES or SHAPES[name](row.data))]
    if not fits:
        raise DataError(f"{row.where}: cannot tell the data format from the columns {sorted(keys)}; "
                        f"expected one of: " + "; ".join(f"{n} ({', '.join(c)})" for n, c in FORMATS.items()))
    kind = next((k for k, names in KINDS.items() if fits[0] in names), fits[0])
    rivals = [n for n in fits[1:] if n in KINDS.get(kind, ()) and not set(FORMATS[n]) <= set(FORMATS[fits[0]])]
    if rivals:
        both = " and ".join(f"{n} ({', '.join(FORMATS[n])})" for n in (fits[0], *rivals))
        raise DataError(f"{row.where}: the columns {sorted(keys)} fit more than one format: {both}; name the one "
                        "meant with --format")
    return fits[0]


def check_columns(row: Row, fmt: str) -> None:
    """A DataError naming the row when it lacks a column of `fmt`."""
    if fmt in PROMPT_LIKE and any(k in row.data for k in ("prompt", "messages")):
        return  # prompt files may mix {"prompt"} and {"messages"} rows (SPEC §3)
    missing = [c for c in FORMATS[fmt] if c not in row.data]
    if missing:
        raise DataError(f"{row.where}: missing column(s) {', '.join(missing)} for the {fmt} format")


def refuse_tools(row: Row, what: str) -> None:
    """Function schemas (`tools`) are rendered for SFT conversations; comparisons and prompts are not rendered with
    them, so a `tools` column there is an error, not dropped."""
    if as_tools(row.data.get("tools"), row.where):
        raise DataError(f"{row.where}: the column 'tools' is read for SFT conversations only; {what} are rendered "
                        "without function schemas (drop the column to use the rows without them)")


def refuse_label(row: Row) -> None:
    """A `label` column is unpaired feedback (KTO: is this completion good?). No command here learns from it, and
    ignoring it would train the bad completions as good ones, so it is an error rather than dropped."""
    if "label" in row.data:
        raise DataError(f"{row.where}: the column 'label' holds unpaired feedback (KTO-style: whether the completion "
                        "is good), which this command does not use; keep the rows with a good label and drop the "
                        "column to train on them, or give comparisons (pairs, rankings, scores) to rm or dpo")


# --- comparisons ------------------------------------------------------------------------------------------


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


def _after_prompt(value: Any, prompt: Messages, where: str, what: str) -> Messages:
    """A response of a pairs row. In the H4 layout (UltraFeedback binarized) it is the whole conversation, which
    repeats the prompt's turns before the response; they are stripped here."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and value[0].get("role") != "assistant":
        msgs = as_messages(value, where, what)
        head = [(m["role"], m["content"].strip()) for m in msgs[:len(prompt)]]
        if head != [(m["role"], m["content"].strip()) for m in prompt]:
            raise DataError(f"{where}: {what} starts with a {msgs[0]['role']} turn but does not repeat the prompt; "
                            "a response is assistant messages, or the whole conversation with the prompt first")
        value = msgs[len(prompt):]
    return as_response(value, where, what)


def _pair(d: dict, where: str) -> tuple[Messages, Messages, Messages]:
    prompt = as_messages(d["prompt"], where, "prompt")
    return prompt, _after_prompt(d["chosen"], prompt, where, "chosen"), _after_prompt(d["rejected"], prompt, where,
                                                                                      "rejected")


def _implicit_pair(d: dict, where: str) -> tuple[Messages, Messages, Messages]:
    if not isinstance(d["chosen"], list) or not isinstance(d["rejected"], list):
        raise DataError(f"{where}: chosen and rejected must both be lists of messages (whole conversations)")
    chosen = as_messages(d["chosen"], where, "chosen")
    return split_conversations(chosen, as_messages(d["rejected"], where, "rejected"), where)


def _sharegpt_pair(d: dict, where: str) -> tuple[Messages, Messages, Messages]:
    prompt = sharegpt(d["conversations"], where, "conversations")
    chosen, rejected = sharegpt(d["chosen"], where, "chosen"), sharegpt(d["rejected"], where, "rejected")
    if any(m["role"] != "assistant" for m in chosen + rejected):
        raise DataError(f"{where}: chosen and rejected may only hold assistant ('gpt') turns")
    return prompt, chosen, rejected


# pair formats -> (prompt, chosen, rejected) of a row
PAIR_SPLITS: dict[str, Callable[[dict, str], tuple[Messages, Messages, Messages]]] = {
    "pairs": _pair,
    "hh": lambda d, where: split_hh_pair(d["chosen"], d["rejected"], where),
    "implicit_pairs": _implicit_pair,
    "sharegpt_pairs": _sharegpt_pair,
}


def _completions(d: dict, where: str) -> tuple[Any, Any]:
    """UltraFeedback's completions, [{"response": ..., "overall_score": ...}], as (responses, scores)."""
    comps = d["completions"]
    if not isinstance(comps, list) or not all(isinstance(c, dict) and "response" in c and "overall_score" in c
                                               for c in comps):
        raise DataError(f"{where}: completions must be a list of objects with 'response' and 'overall_score'")
    for i, c in enumerate(comps):  # named here, as the person sees them in the file
        s = c["overall_score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{where}: completions[{i}].overall_score must be a finite number, got {s!r}")
    return [c["response"] for c in comps], [c["overall_score"] for c in comps]


# formats of K responses -> (responses, ranking or scores) of a row
RESPONSE_SETS: dict[str, Callable[[dict, str], tuple[Any, Any]]] = {
    "rankings": lambda d, where: (d["responses"], d["ranking"]),
    "scored": lambda d, where: (d["responses"], d["scores"]),
    "scored_completions": _completions,
}


def to_preference(row: Row, fmt: str, min_score_gap: float = 0.0) -> Preference:
    """Comparison view of a row; scored responses give the pairs of their scores, less those closer than
    `min_score_gap`."""
    d, where = row.data, row.where
    refuse_label(row)
    refuse_tools(row, "comparisons")
    margin = d.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DataError(f"{where}: margin must be a finite number, got {margin!r}")
    if fmt in PAIR_SPLITS:
        prompt, chosen, rejected = PAIR_SPLITS[fmt](d, where)
        return Preference(prompt, [chosen, rejected], [(0, 1)], margin, where)
    if fmt in RESPONSE_SETS:
        prompt = as_messages(d["prompt"], where, "prompt")
        responses, order = RESPONSE_SETS[fmt](d, where)
        if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
            raise DataError(f"{where}: responses must be a list of 2 to {MAX_RESPONSES} responses")
        resp = [as_response(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        if fmt == "rankings":
            return Preference(prompt, resp, checked_ranking_pairs(order, len(resp), where), margin, where)
        pairs, dropped = score_pairs(order, len(resp), min_score_gap, where)
        return Preference(prompt, resp, pairs, margin, where, dropped)
    raise DataError(f"{where}: the {fmt} format holds no comparisons (need pairs, rankings, scores or HH "
                    "chosen/rejected)")


# --- demonstrations and prompts ---------------------------------------------------------------------------


def to_conversation(row: Row, fmt: str) -> Conversation:
    """SFT view of any format. Comparison formats contribute their best response."""
    d, where = row.data, row.where
    refuse_label(row)
    if fmt == "text":
        if not isinstance(d["text"], str):
            raise DataError(f"{where}: text must be a string")
        return Conversation([], where, text=d["text"])
    if fmt == "conversations":
        if "messages" not in d:
            raise DataError(f"{where}: missing column messages for the conversations format")
        msgs = as_messages(d["messages"], where, "messages")
    elif fmt == "sharegpt":
        msgs = sharegpt(d["conversations"], where, "conversations")
    elif fmt in ("prompt_completion", "prompt_response"):  # prompt_response: what generate and best-of-n write
        reply = "completion" if fmt == "prompt_completion" else "response"
        msgs = as_messages(d["prompt"], where, "prompt") + as_response(d[reply], where, reply)
    elif fmt == "alpaca":
        if not isinstance(d["instruction"], str) or not isinstance(d["output"], str):
            raise DataError(f"{where}: instruction and output must be strings")
        extra = d.get("input") or ""
        user = d["instruction"] + (f"\n\n{extra}" if extra else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]
    elif fmt == "hh_text":
        msgs = parse_hh(d["text"], where)
    elif fmt in COMPARISONS:
        pref = to_preference(row, fmt)
        best = pref.pairs[0][0] if pref.pairs else 0
        msgs = pref.prompt + pref.responses[best]
    else:
        raise DataError(f"{where}: the {fmt} format has no responses to train on")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return Conversation(msgs, where, tools=as_tools(d.get("tools"), where))


def _without_reply(msgs: Messages) -> Messages:
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def to_prompt(row: Row, fmt: str) -> Prompt:
    d, where = row.data, row.where
    refuse_tools(row, "prompts")
    if fmt in PROMPT_LIKE:
        fmt = "conversations" if "messages" in d else "prompts"
    if fmt == "conversations":
        msgs = _without_reply(as_messages(d["messages"], where, "messages"))
    elif fmt == "sharegpt":
        msgs = _without_reply(sharegpt(d["conversations"], where, "conversations"))
    elif fmt == "hh_text":
        msgs = _without_reply(parse_hh(d["text"], where))
    elif fmt in COMPARISONS:
        msgs = to_preference(row, fmt).prompt
    elif fmt == "alpaca":
        msgs = to_conversation(row, fmt).messages[:-1]
    elif fmt == "text":
        raise DataError(f"{where}: plain text has no prompt (give prompts, conversations or comparisons)")
    else:
        msgs = as_messages(d["prompt"], where, "prompt")
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(f"{where}: a prompt must end with a user turn")
    if not any(m["content"].strip() for m in msgs):
        raise DataError(f"{where}: the prompt is empty")
    return Prompt(msgs, where)
