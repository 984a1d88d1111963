"""Loss masks, checked token by token on SmolLM2's real chat template."""

from __future__ import annotations

import pytest
import torch

from rlhfkit import TemplateError
from rlhfkit.data import chat, formats, io
from rlhfkit.data.collate import collate, pack


def trained_spans(tok, ex) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    spans, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_multi_turn_every_assistant_turn_and_its_end_token_is_trained(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]
    ex = chat.tokenize_conversation(tok, msgs)
    assert trained_spans(tok, ex) == ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"]
    # the tokens are exactly those of the template's full rendering
    assert ex.input_ids == tok(chat.render(tok, msgs), add_special_tokens=False)["input_ids"]
    # token by token: the trained tokens are the assistant contents plus <|im_end|>, nothing of the scaffolding
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    untrained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if not m]
    text = tok.decode(untrained)
    assert "Hi there" in text and "Be brief." in text and "<|im_start|>assistant\n" in text
    assert text.count("<|im_end|>") == 3  # system, and both user turns
    trained_end = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m and t == im_end]
    assert len(trained_end) == 2
    # the newline after each assistant <|im_end|> is template scaffolding: untrained
    for t in range(len(ex.input_ids) - 1):
        if ex.input_ids[t] == im_end and ex.loss_mask[t]:
            assert ex.loss_mask[t + 1] == 0


def test_default_system_prompt_of_the_template_is_untrained(tok):
    ex = chat.tokenize_conversation(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert trained_spans(tok, ex) == ["4<|im_end|>"]
    assert "You are a helpful AI assistant" in tok.decode(ex.input_ids)


def test_hh_transcript_with_two_assistant_turns(tok):
    row = io.Row({"text": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Goodbye!"}, "x.jsonl:3")
    conv = formats.to_conversation(row, "hh_text")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    ex = chat.tokenize_conversation(tok, conv.messages)
    assert trained_spans(tok, ex) == ["Hello.<|im_end|>", "Goodbye!<|im_end|>"]


def test_hh_pair_prompt_is_shared_prefix(tok):
    row = io.Row({"chosen": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
                  "rejected": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad"}, "hh.jsonl:1")
    pref = formats.to_preference(row, "hh")
    assert pref.prompt == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                           {"role": "user", "content": "Q2"}]
    assert pref.responses == [[{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]]
    # SFT on an HH pair trains the chosen reply and the earlier assistant turn of the transcript
    ex = chat.tokenize_conversation(tok, formats.to_conversation(row, "hh").messages)
    assert trained_spans(tok, ex) == ["A1<|im_end|>", "good<|im_end|>"]


def test_alpaca_row_with_and_without_input(tok):
    with_input = io.Row({"instruction": "Translate", "input": "chat", "output": "cat"}, "a.jsonl:1")
    conv = formats.to_conversation(with_input, "alpaca")
    assert conv.messages[0] == {"role": "user", "content": "Translate\n\nchat"}
    ex = chat.tokenize_conversation(tok, conv.messages)
    assert trained_spans(tok, ex) == ["cat<|im_end|>"]
    bare = formats.to_conversation(io.Row({"instruction": "Say hi", "input": "", "output": "hi"}, "a:2"), "alpaca")
    assert bare.messages[0]["content"] == "Say hi"


def test_response_starting_with_newlines_is_encoded_as_generated(tok):
    """"assistant\\n" + "\\n\\nHi" would merge into one newline token across the turn boundary; pieces are encoded
    apart, so the prompt's tokens are exactly the generation prompt's and the response's are its own."""
    prompt = [{"role": "user", "content": "Say hi."}]
    response = [{"role": "assistant", "content": "\n\nHi"}]
    ex = chat.tokenize_response(tok, prompt, response)
    head = chat.encode(tok, chat.render(tok, prompt, add_generation_prompt=True))
    assert ex.input_ids[:len(head)] == head and not any(ex.loss_mask[:len(head)])
    trained = [i for i, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert trained == chat.encode(tok, "\n\nHi<|im_end|>")
    assert chat.tokenize_conversation(tok, prompt + response).loss_mask == ex.loss_mask


def test_template_that_rewrites_earlier_turns_fails_loudly(tok):
    bad = tok.__class__.from_pretrained(tok.name_or_path)
    # renders the number of messages first, so every prefix rendering differs from the full one
    bad.chat_template = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(TemplateError, match="prefix property"):
        chat.tokenize_conversation(bad, msgs, "f.jsonl:7")


def test_truncation_keeps_start_and_counts(tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    huge_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    convs = [formats.Conversation(m, f"f:{i}") for i, m in enumerate([long, short, huge_prompt])]
    rows, report = chat.tokenize_conversations(tok, convs, max_length=64)
    assert report.truncated == 2 and report.skipped_no_loss == 1 and report.examples == 2
    full = chat.tokenize_conversation(tok, long)
    assert rows[0].input_ids == full.input_ids[:64] and sum(rows[0].loss_mask) > 0


def test_every_bundled_sample_is_detected_and_renders(tok):
    expected = {"conversations": "conversations", "prompt_completion": "prompt_completion", "alpaca": "alpaca",
                "hh": "hh", "hh_sft": "hh_text", "pairs": "pairs", "rankings": "rankings", "prompts": "prompts"}
    for name, fmt in expected.items():
        rows = io.read_rows(f"sample:{name}")
        assert formats.detect_format(rows) == fmt, name
        if fmt == "prompts":
            assert all(formats.to_prompt(r, fmt).messages[-1]["role"] == "user" for r in rows)
            continue
        examples, report = chat.tokenize_conversations(tok, [formats.to_conversation(r, fmt) for r in rows], 512)
        assert report.examples == len(rows) and all(sum(e.loss_mask) > 0 for e in examples)


def test_packed_rows_do_not_attend_across_examples(tok):
    from rlhfkit import models

    model = models.load_causal_lm("tiny-llama", tokenizer=tok).eval()
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * (i + 1)}]
             for i in range(4)]
    examples = [chat.tokenize_conversation(tok, c) for c in convs]
    packed = pack(examples, max_length=256)
    assert len(packed) == 1
    batch = collate(packed, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        offset = 0
        for ex in sorted(examples, key=lambda e: -len(e.input_ids)):  # the packing order
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[offset:offset + n], alone, atol=1e-4, rtol=1e-4)
            offset += n
