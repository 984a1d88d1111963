"""Render conversations through the chat template and compute exact token-level loss masks.

Templates rarely carry `{% generation %}` markers, so masks are found by rendering incrementally: for each
assistant turn i, the tokens of `messages[:i]` plus the generation prompt are a prefix of the tokens of
`messages[:i+1]`, which are a prefix of the tokens of the whole conversation. The assistant span is what lies
between, cut just after its end-of-turn token (so the model learns to stop, while the template's newline
after it stays untrained). The prefix property is checked token by token; a template that breaks it (one that
rewrites earlier turns, or whose token merges cross a turn boundary) fails loudly, naming the template.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit import TemplateError
from rlhfkit.data.formats import Messages

# end-of-turn markers of common templates; the tokenizer's eos is always one
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as tokens. `loss_mask[t]` is 1 where token t is predicted and trained."""

    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,)
    where: str
    truncated: bool = False


def end_of_turn_ids(tok) -> set[int]:
    # token by token, not through get_vocab(), which builds the whole vocabulary dict (~50 ms for SmolLM2's)
    found = {t: tok.convert_tokens_to_ids(t) for t in END_OF_TURN}
    ids = {i for t, i in found.items() if i is not None and tok.convert_ids_to_tokens(i) == t}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def render(tok, messages: Messages, add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       tools=tools)
    except Exception as e:  # jinja raises its own types, e.g. for role-order checks inside templates
        raise TemplateError(f"the chat template of {tok.name_or_path!r} failed to render: {e}") from None


def check_tools_rendered(tok, messages: Messages, tools: list[dict] | None, full: str, where: str) -> None:
    """A template that ignores function schemas or an assistant's tool calls would drop them from the training text
    without a word (SmolLM2's does): an error naming the template instead. `full`: the rendering with both."""
    if tools and render(tok, messages) == full:
        raise TemplateError(f"{where}: the chat template of {tok.name_or_path!r} does not render the 'tools' column; "
                            "use a model whose template supports tools, or drop the column")
    if any("tool_calls" in m for m in messages):
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if render(tok, bare, tools=tools) == full:
            raise TemplateError(f"{where}: the chat template of {tok.name_or_path!r} does not render tool_calls; use a "
                                "model whose template supports tool calls")


def encode(tok, text: str) -> list[int]:
    # the template writes special tokens (BOS, role markers) itself
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tok, messages: Messages) -> list[int]:
    """A prompt's tokens as generation sees them: rendered with the generation prompt (the assistant's header)."""
    return encode(tok, render(tok, messages, add_generation_prompt=True))


def _check_prefix(tok, prefix: str, full: str, where: str, turn: int) -> None:
    if not full.startswith(prefix):
        at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
        raise TemplateError(
            f"{where}: the chat template of {tok.name_or_path!r} breaks the prefix property at message {turn} "
            f"(character {at}): rendering the conversation up to that turn is not a prefix of the full "
            "rendering, so loss masks cannot be exact. Use a template that renders turns append-only.")


def assistant_cuts(tok, messages: Messages, full: str, where: str, tools: list[dict] | None = None
                   ) -> list[tuple[int, int]]:
    """[start, end) character spans of every assistant turn in the rendering `full` (its end-of-turn included)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tok, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = render(tok, messages[: i + 1], tools=tools)
        _check_prefix(tok, head, upto, where, i)
        _check_prefix(tok, upto, full, where, i)
        spans.append((len(head), len(upto)))
    return spans


def _encode_turns(tok, messages: Messages, where: str, tools: list[dict] | None = None
                  ) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, loss_mask, start token of every assistant turn): the rendering encoded piece by piece, cut where
    each assistant turn starts and ends, so a token merge can never straddle a turn boundary (a response that starts
    with a newline would otherwise merge with the template's "assistant\\n"); these are the tokens a model sees when
    it generates the turn after the prompt. Each assistant piece is trained up to and including its last
    end-of-turn token (the model learns to stop; the template's newline after it stays untrained). `tools`: the
    function schemas the template renders (where it renders them: `check_tools_rendered`)."""
    full = render(tok, messages, tools=tools)
    if tools or any("tool_calls" in m for m in messages):
        check_tools_rendered(tok, messages, tools, full, where)
    eot = end_of_turn_ids(tok)
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    pos = 0
    for start, end in assistant_cuts(tok, messages, full, where, tools):
        context = encode(tok, full[pos:start])
        piece = encode(tok, full[start:end])
        stops = [t for t, x in enumerate(piece) if x in eot]
        trained = stops[-1] + 1 if stops else len(piece)
        ids += context
        starts.append(len(ids))
        ids += piece
        mask += [0] * len(context) + [1] * trained + [0] * (len(piece) - trained)
        pos = end
    rest = encode(tok, full[pos:]) if pos < len(full) else []
    return ids + rest, mask + [0] * len(rest), starts


def tokenize_conversation(tok, messages: Messages, where: str = "", max_length: int | None = None,
                          tools: list[dict] | None = None) -> TokenizedExample:
    """Tokens and loss mask of one conversation (rendered with `tools`, the row's function schemas); truncation keeps
    the start and cuts the end."""
    ids, mask, _ = _encode_turns(tok, messages, where, tools)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, where, truncated)


def tokenize_response(tok, prompt: Messages, response: Messages, where: str = "", max_length: int | None = None
                      ) -> TokenizedExample:
    """prompt + response, with loss on the response only: assistant turns inside the prompt (earlier turns of a
    multi-turn prompt) are context. The loss-carrying tokens are exactly those of the sequence log-prob
    log π(y | x) that DPO and PPO use."""
    ids, mask, starts = _encode_turns(tok, prompt + response, where)
    k = sum(m["role"] == "assistant" for m in prompt)  # the response's first turn is assistant turn k
    n_prompt = starts[k] if k < len(starts) else len(ids)
    mask = [0] * n_prompt + mask[n_prompt:]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, where, truncated)


def tokenize_text(tok, text: str, where: str = "", max_length: int | None = None) -> TokenizedExample:
    """Plain text as a language-modelling example: no chat template, the tokenizer's own special tokens (BOS where it
    adds one) and eos at the end, every token trained but the first (nothing before it predicts it)."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)  # the model learns where a text ends
    mask = [0] + [1] * (len(ids) - 1)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, where, truncated)


@dataclass
class TokenizeReport:
    """What tokenisation did to a data set; printed and logged so nothing is dropped silently."""

    examples: int = 0
    truncated: int = 0
    skipped_no_loss: int = 0  # prompt alone filled max_length: nothing left to train on
    skipped_empty: int = 0  # every assistant turn (or a plain text) empty: it would only teach to stop at once

    def as_dict(self) -> dict[str, int]:
        return {"data/examples": self.examples, "data/truncated": self.truncated,
                "data/skipped_no_loss": self.skipped_no_loss, "data/skipped_empty": self.skipped_empty}

    def skipped(self) -> str:
        """What was left out, for the data line a trainer prints."""
        return (f"{self.skipped_no_loss} skipped (no response token left), {self.skipped_empty} skipped (empty "
                "response)")


def tokenize_conversations(tok, conversations, max_length: int) -> tuple[list[TokenizedExample], TokenizeReport]:
    report = TokenizeReport()
    out = []
    for conv in conversations:
        if conv.text is not None:  # plain text: trained whole
            if not conv.text.strip():
                report.skipped_empty += 1
                continue
            ex = tokenize_text(tok, conv.text, conv.where, max_length)
        elif not any(m["content"].strip() or m.get("tool_calls") for m in conv.messages if m["role"] == "assistant"):
            report.skipped_empty += 1
            continue
        else:
            ex = tokenize_conversation(tok, conv.messages, conv.where, max_length, conv.tools)
        report.truncated += ex.truncated
        if not any(ex.loss_mask):
            report.skipped_no_loss += 1
            continue
        out.append(ex)
    report.examples = len(out)
    return out, report
