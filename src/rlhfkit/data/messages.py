"""Parse the values of a row into message lists (`[{"role": ..., "content": ...}]`), the canonical form of
`formats`: role/content messages (with text content parts, tool calls and tool results), ShareGPT's from/value turns,
Anthropic HH transcripts, OpenAssistant trees, and the prompt two whole conversations share. Every error names the
row (`where`) and the value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rlhfkit import DataError

# role and content (a string); tool_calls on assistant turns, tool_call_id and name on tool turns
Messages = list[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
# keys a message keeps beside role and content, for the chat template (transformers' tool-use convention)
TOOL_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}
# ShareGPT's speaker names -> roles; "gpt" and "human" are the original ones, the others are common variants
# (LLaMA-Factory's "function_call" is an assistant turn whose text is the call, "observation" the tool's result)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
ASSISTANT_TURN = "\n\nAssistant:"


def _content(value: Any, where: str, what: str) -> str:
    """A message's content: a string, or a list of content parts of which only text parts are supported."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: {what}[{j}] is a content part of type {kind!r}; only text parts "
                                "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        # joined without a separator, as chat templates that iterate over content parts render them
        return "".join(texts)
    raise DataError(f"{where}: {what} must be a string or a list of text content parts")


def as_messages(value: Any, where: str, what: str) -> Messages:
    """A message list from a list of {role, content} dicts (validated) or a plain string (one user turn). Tool
    messages and an assistant's `tool_calls` are kept for the template to render; only assistant turns are trained.
    An assistant turn that only calls tools may have no content (read as "")."""
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
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise DataError(f"{where}: {what}[{i}].tool_calls must be a list, on an assistant message")
        content = "" if m["content"] is None and calls else _content(m["content"], where, f"{what}[{i}].content")
        out.append({"role": m["role"], "content": content,
                    **{k: m[k] for k in TOOL_KEYS.get(m["role"], ()) if m.get(k) is not None}})
    return out


def as_tools(value: Any, where: str) -> list[dict] | None:
    """A row's `tools` column: the JSON schemas of the functions the conversation may call, as a list or as the JSON
    text of one (LLaMA-Factory's ShareGPT files); handed to the chat template as `tools`."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: tools is a string but not JSON ({e.msg})") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: tools must be a list of function schemas (objects)")
    return value or None


def as_response(value: Any, where: str, what: str) -> Messages:
    """A response: a string (one assistant turn) or a list of assistant messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = as_messages(value, where, what)
    if any(m["role"] != "assistant" for m in msgs):
        raise DataError(f"{where}: {what} may only hold assistant messages")
    return msgs


def sharegpt(value: Any, where: str, what: str) -> Messages:
    """ShareGPT turns (`[{"from": "human"|"gpt"|..., "value": ...}]`, or one such turn) as a message list."""
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {what} must be a non-empty list of {{from, value}} turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: {what}[{i}] must be an object with 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: {what}[{i}] is from {t['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": _content(t["value"], where, f"{what}[{i}].value")})
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def looks_like_hh(text: Any) -> bool:
    """Whether `text` is an HH transcript: nothing but whitespace before its first "\\n\\nHuman:" turn."""
    if not isinstance(text, str):
        return False
    parts = _HH_TURN.split(text, maxsplit=1)
    return len(parts) == 3 and parts[1] == "Human" and not parts[0].strip()


def parse_hh(text: str, where: str) -> Messages:
    """An Anthropic HH transcript ("\\n\\nHuman: …\\n\\nAssistant: …") as a message list."""
    if not isinstance(text, str):
        raise DataError(f"{where}: an HH transcript must be a string")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_hh_pair(chosen: Any, rejected: Any, where: str) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen response, rejected response) of an HH pair. The prompt is the longest prefix both transcripts
    share that ends at an "\\n\\nAssistant:" turn (what TRL's prompt extraction does), not the text up to the chosen
    side's last Assistant turn: in some of Anthropic's rows an assistant turn holds an inline "Human:" without the
    blank line, and the transcripts part one turn earlier. The responses are the rest of each transcript, one or
    more turns (later user turns are context, not trained)."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{where}: HH chosen and rejected must be strings")
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    cut = chosen.rfind(ASSISTANT_TURN, 0, shared)
    if cut < 0:
        raise DataError(f"{where}: chosen and rejected share no prefix that ends at an '\\n\\nAssistant:' turn "
                        f"(they differ from character {shared})")
    prompt = parse_hh(chosen[:cut], where)
    start = cut + len(ASSISTANT_TURN)
    return prompt, parse_hh_reply(chosen[start:], where), parse_hh_reply(rejected[start:], where)


def parse_hh_reply(text: str, where: str) -> Messages:
    """The turns after an "\\n\\nAssistant:": the assistant's reply, then any later turns of the transcript."""
    parts = _HH_TURN.split(text)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": "assistant", "content": parts[0].strip()}] + [
        {"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_conversations(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen response, rejected response) of two whole conversations: the prompt is their longest shared
    prefix of messages that ends just before an assistant turn on both sides."""
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    cut = next((i for i in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1)
                if chosen[i]["role"] == rejected[i]["role"] == "assistant"), 0)
    if cut == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt: no common run of messages that ends before "
                        f"an assistant turn (they differ from message {shared})")
    return chosen[:cut], chosen[cut:], rejected[cut:]


Pairs = list[tuple[int, int]]


def score_pairs(scores: Any, k: int, min_gap: float, where: str) -> tuple[Pairs, int]:
    """(winner, loser) pairs of `k` scored responses, best first; equal scores are ties and give no pair, and a pair
    whose score difference is below `min_gap` is dropped. Returns the pairs and how many were dropped for the gap."""
    if not isinstance(scores, list) or len(scores) != k:
        raise DataError(f"{where}: scores must be a list of {k} numbers, one per response")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{where}: scores[{i}] must be a finite number, got {s!r}")
    order = sorted(range(k), key=lambda i: -scores[i])  # stable: equal scores keep their order
    ordered = [(w, l) for a, w in enumerate(order) for l in order[a + 1:] if scores[w] > scores[l]]
    kept = [(w, l) for w, l in ordered if scores[w] - scores[l] >= min_gap]
    return kept, len(ordered) - len(kept)


# OpenAssistant's message trees: a prompter ("user") message, its assistant replies, their prompter replies, ...
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_rankings(root: Any, where: str) -> list[tuple[dict, str]]:
    """The rankings of an OpenAssistant message tree (oasst1/oasst2 `*.trees.jsonl`, whose `prompt` is the root
    message): one `rankings` row ({prompt, responses, ranking}) per user message with two or more ranked assistant
    replies, the prompt being the thread from the root to it; with where each came from (`where (message ID)`).
    Replies that are deleted, failed review or have no rank are not compared; equal ranks are ties."""
    out: list[tuple[dict, str]] = []

    def visit(node: Any, thread: Messages, path: str) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("text"), str) or node.get("role") not in OASST_ROLES:
            raise DataError(f"{path}: a message of an OpenAssistant tree must be an object with a string 'text' and "
                            f"a role of {' or '.join(OASST_ROLES)}")
        thread = thread + [{"role": OASST_ROLES[node["role"]], "content": node["text"]}]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(f"{path}: replies must be a list of messages")
        ranked = [r for r in replies if isinstance(r, dict) and r.get("role") == "assistant"
                  and isinstance(r.get("rank"), int) and not r.get("deleted") and r.get("review_result") is not False]
        if node["role"] == "prompter" and len(ranked) >= 2:
            ranked.sort(key=lambda r: r["rank"])  # rank 0 is the best
            ranks = sorted({r["rank"] for r in ranked})
            ranking = [[i for i, r in enumerate(ranked) if r["rank"] == k] for k in ranks]
            out.append(({"prompt": thread, "responses": [r["text"] for r in ranked],
                         "ranking": [g[0] if len(g) == 1 else g for g in ranking]}, path))
        for r in replies:
            visit(r, thread, f"{where} (message {r.get('message_id', '?') if isinstance(r, dict) else '?'})")

    visit(root, [], f"{where} (message {root.get('message_id', '?') if isinstance(root, dict) else '?'})")
    return out
