"""Render conversations through the chat template and compute exact token-level loss masks.

Templates rarely carry `{% generation %}` markers, so masks are found by rendering incrementally: for each
assistant turn i, the tokens of `messages[:i]` plus the generation prompt are a prefix of the tokens of
`messages[:i+1]`, which are a prefix of the tokens of the whole conversation. The assistant span is what lies
between, cut just after its end-of-turn token (so the model learns to stop, while the template's newline
after it stays untrained). The prefix property is checked token by token; a template that breaks it (one that
rewrites earlier turns, or whose token merges cross a turn boundary) fails loudly, naming the template.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    vocab = tok.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN if t in vocab}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def render(tok, messages: Messages, add_generation_prompt: bool = False) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own types, e.g. for role-order checks inside templates
        raise TemplateError(f"the chat template of {tok.name_or_path!r} failed to render: {e}") from None


def encode(tok, text: str) -> list[int]:
    # the template writes special tokens (BOS, role markers) itself
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_prefix(tok, prefix: list[int], full: list[int], where: str, turn: int) -> None:
    if full[: len(prefix)] != prefix:
        at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
        raise TemplateError(
            f"{where}: the chat template of {tok.name_or_path!r} breaks the prefix property at message {turn} "
            f"(token {at}): rendering the conversation up to that turn is not a token prefix of the full "
            "rendering, so loss masks cannot be exact. Use a template that renders turns append-only.")


def assistant_spans(tok, messages: Messages, full: list[int], where: str) -> list[tuple[int, int]]:
    """[start, end) token spans of every assistant turn in `full`, each ending at its end-of-turn token."""
    eot = end_of_turn_ids(tok)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = encode(tok, render(tok, messages[:i], add_generation_prompt=True)) if i else []
        upto = encode(tok, render(tok, messages[: i + 1]))
        _check_prefix(tok, head, upto, where, i)
        _check_prefix(tok, upto, full, where, i)
        start, end = len(head), len(upto)
        stops = [t for t in range(start, end) if upto[t] in eot]
        spans.append((start, stops[-1] + 1 if stops else end))
    return spans


def tokenize_conversation(tok, messages: Messages, where: str = "", max_length: int | None = None
                          ) -> TokenizedExample:
    """Tokens and loss mask of one conversation; truncation keeps the start and cuts the end."""
    ids = encode(tok, render(tok, messages))
    mask = [0] * len(ids)
    for start, end in assistant_spans(tok, messages, ids, where):
        mask[start:end] = [1] * (end - start)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedExample(ids, mask, where, truncated)


def tokenize_response(tok, prompt: Messages, response: Messages, where: str = "", max_length: int | None = None
                      ) -> TokenizedExample:
    """prompt + response, with loss on the response only: assistant turns inside the prompt (earlier turns of a
    multi-turn prompt) are context. The loss-carrying tokens are exactly those of the sequence log-prob
    log π(y | x) that DPO and PPO use."""
    ex = tokenize_conversation(tok, prompt + response, where, max_length)
    n_prompt = len(encode(tok, render(tok, prompt, add_generation_prompt=True)))
    return replace(ex, loss_mask=[0] * min(n_prompt, len(ex.loss_mask)) + ex.loss_mask[n_prompt:])


@dataclass
class TokenizeReport:
    """What tokenisation did to a data set; printed and logged so nothing is dropped silently."""

    examples: int = 0
    truncated: int = 0
    skipped_no_loss: int = 0  # prompt alone filled max_length: nothing left to train on

    def as_dict(self) -> dict[str, int]:
        return {"data/examples": self.examples, "data/truncated": self.truncated,
                "data/skipped_no_loss": self.skipped_no_loss}


def tokenize_conversations(tok, conversations, max_length: int) -> tuple[list[TokenizedExample], TokenizeReport]:
    report = TokenizeReport()
    out = []
    for conv in conversations:
        ex = tokenize_conversation(tok, conv.messages, conv.where, max_length)
        report.truncated += ex.truncated
        if not any(ex.loss_mask):
            report.skipped_no_loss += 1
            continue
        out.append(ex)
    report.examples = len(out)
    return out, report
