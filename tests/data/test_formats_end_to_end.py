"""Data nobody here wrote, end to end: each format a user brings trains on tiny-llama from the command line
(`cli.main`, in-process, 2 steps), and what was skipped or dropped is read back from run.json and the preview's JSON.
The fixtures reproduce the quirks of the real files (tests/data/test_formats.py has the row-level checks)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhfkit import cli

from tests.conftest import write_jsonl
from tests.data.test_formats import HH_INLINE, HH_UNSPLITTABLE

COMMON = ["--model", "tiny-llama", "--max-steps", "2", "--batch-size", "2", "--dtype", "fp32", "--val-fraction", "0",
          "--max-length", "128", "--lr", "1e-3"]
QUESTIONS = ["Name a colour.", "Name a fruit.", "Name a city.", "Name a tree."]
GOOD = ["Blue, thank you for asking.", "An apple, thank you for asking.", "Paris, thank you for asking.",
        "An oak, thank you for asking."]
BAD = ["No.", "Whatever.", "Go away.", "Ugh."]


def train(tmp_path: Path, command: str, data: Path | str, *extra: str) -> dict:
    """Run `rlhfkit COMMAND` on `data` and return its run.json."""
    out = tmp_path / f"{command}_out"
    assert cli.main([command, *COMMON, "--data", str(data), "--output", str(out), *extra]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["final_metrics"]["train/steps"] == 2
    return record


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hh(q: str, a: str) -> str:
    return f"\n\nHuman: {q}\n\nAssistant: {a}"


def test_gzipped_hh_trains_with_inline_human_rows_and_skips_unsplittable_ones_when_asked(tmp_path, capsys):
    rows = [HH_INLINE] + [{"chosen": hh(q, g), "rejected": hh(q, b)} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    rows.insert(3, HH_UNSPLITTABLE)  # line 4
    data = tmp_path / "harmless_test.jsonl.gz"  # gzipped JSON Lines, as Anthropic ships HH
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    # by default the unsplittable row stops every command that reads it, naming file and line
    for argv in (["rm", *COMMON, "--output", str(tmp_path / "x")], ["dpo", *COMMON, "--output", str(tmp_path / "x")],
                 ["data", "preview", "--model", "tiny-llama"]):
        assert cli.main([*argv, "--data", str(data)]) == 1
        assert capsys.readouterr().err.endswith(f"error: {data}:4: chosen and rejected share no prefix that ends at an "
                                                "'\\n\\nAssistant:' turn (they differ from character 10)\n")
    # with --skip-invalid it is left out, counted and named; the inline-"Human:" row trains
    first = [f"{data}:4: chosen and rejected share no prefix that ends at an '\\n\\nAssistant:' turn (they differ "
             "from character 10)"]
    for command, examples in (("rm", "data/examples"), ("dpo", "data/pairs")):
        record = train(tmp_path, command, data, "--skip-invalid")
        assert record["data"]["data/skipped_invalid"] == 1 and record["data"]["data/skipped_invalid_first"] == first
        assert record["data"][examples] == 5
        assert f"data: 1 invalid rows skipped (--skip-invalid); the first: {first[0]}" in capsys.readouterr().out
    assert cli.main(["data", "preview", "--model", "tiny-llama", "--data", str(data), "--skip-invalid", "--json",
                     "--limit", "1"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown[-1] == {"data/skipped_invalid": 1, "data/skipped_invalid_first": first}
    assert [s["response"] for s in shown[:-1]] == ["chosen", "rejected"] and shown[0]["format"] == "hh"
    # the prompt ends before the first assistant turn: the chosen side's both assistant turns are its response
    chosen = shown[0]
    trained = "".join(t for t, m in zip(chosen["tokens"], chosen["loss_mask"]) if m).replace("Ġ", " ")
    assert "Mix flour and water. Human: and then?" in trained and "Let it rise, then bake it." in trained


def test_implicit_prompt_pairs_train_dpo(tmp_path):
    rows = [{"chosen": [user(q), assistant(g)], "rejected": [user(q), assistant(b)]}
            for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    record = train(tmp_path, "dpo", write_jsonl(tmp_path / "implicit.jsonl", rows))
    assert record["data"]["data/pairs"] == 4


def test_h4_layout_trains_rm(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized: prompt + whole conversations that repeat it, and a messages column
    rows = [{"prompt": q, "chosen": [user(q), assistant(g)], "rejected": [user(q), assistant(b)],
             "messages": [user(q), assistant(g)], "score_chosen": 8.0, "score_rejected": 3.0}
            for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    record = train(tmp_path, "rm", write_jsonl(tmp_path / "h4.jsonl", rows))
    assert record["data"]["data/examples"] == 4


def sharegpt_turns(q: str, a: str | None = None) -> list[dict]:
    turns = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": q}]
    return turns + ([{"from": "gpt", "value": a}] if a else [])


def test_sharegpt_conversations_train_sft(tmp_path):
    rows = [{"conversations": sharegpt_turns(q, g)} for q, g in zip(QUESTIONS, GOOD)]
    record = train(tmp_path, "sft", write_jsonl(tmp_path / "sharegpt.jsonl", rows))
    assert record["data"]["data/examples"] == 4


def test_sharegpt_preferences_train_dpo(tmp_path):
    rows = [{"conversations": sharegpt_turns(q), "chosen": {"from": "gpt", "value": g},
             "rejected": {"from": "gpt", "value": b}} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    record = train(tmp_path, "dpo", write_jsonl(tmp_path / "sharegpt_pairs.jsonl", rows))
    assert record["data"]["data/pairs"] == 4


def test_scored_responses_train_rm_with_ties_and_a_minimum_gap(tmp_path):
    # scores 9, 9, 8.5, 2: the first two tie (no pair); with a gap of 1, the pairs over 8.5 are near-ties
    rows = [{"prompt": q, "responses": [g, g.upper(), g.lower(), b], "scores": [9, 9, 8.5, 2]}
            for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    record = train(tmp_path, "rm", write_jsonl(tmp_path / "scored.jsonl", rows), "--min-score-gap", "1")
    assert record["data"]["data/below_score_gap"] == 4 * 2 and record["data"]["data/examples"] == 4


def test_ultrafeedback_completions_train_dpo_with_a_minimum_gap(tmp_path):
    rows = [{"prompt": q, "completions": [{"response": g, "overall_score": 8.0},
                                          {"response": g.lower(), "overall_score": 7.5},
                                          {"response": b, "overall_score": 3.0}]}
            for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    record = train(tmp_path, "dpo", write_jsonl(tmp_path / "ultrafeedback.jsonl", rows), "--min-score-gap", "1")
    assert record["data"]["data/below_score_gap"] == 4 and record["data"]["data/pairs"] == 4 * 2


def test_json_lines_saved_as_json_with_content_parts_train_sft(tmp_path):
    import datasets

    def parts(text: str) -> list[dict]:
        return [{"type": "text", "text": text}]

    rows = [{"messages": [{"role": "user", "content": parts(q)}, {"role": "assistant", "content": parts(g)}]}
            for q, g in zip(QUESTIONS, GOOD)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "sft.json"))  # JSON Lines, though named .json
    record = train(tmp_path, "sft", tmp_path / "sft.json")
    assert record["data"]["data/examples"] == 4


def test_plain_text_rows_train_sft(tmp_path):
    rows = [{"text": f"{q} {g}"} for q, g in zip(QUESTIONS, GOOD)]
    record = train(tmp_path, "sft", write_jsonl(tmp_path / "text.jsonl", rows))
    assert record["data"]["data/examples"] == 4


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_a_label_column_is_refused_naming_it(tmp_path, capsys, command):
    data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": q, "completion": g, "label": i % 2 == 0}
                                                for i, (q, g) in enumerate(zip(QUESTIONS, GOOD))])
    assert cli.main([command, *COMMON, "--data", data, "--output", str(tmp_path / "o")]) == 1
    assert f"error: {data}:1: the column 'label' holds unpaired feedback" in capsys.readouterr().err


def test_openassistant_trees_train_rm_and_dpo(tmp_path):
    from tests.data.test_formats import OASST_TREE

    data = write_jsonl(tmp_path / "oasst.trees.jsonl", [OASST_TREE] * 2)  # 2 rankings a tree: 3 pairs
    assert train(tmp_path, "rm", data)["data"]["data/examples"] == 4
    assert train(tmp_path, "dpo", data)["data"]["data/pairs"] == 6


def test_generate_output_trains_sft_and_score_rewards_both_sides_of_pairs(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    samples = tmp_path / "samples.jsonl"
    assert cli.main(["generate", "--model", "tiny-llama", "--prompts", prompts, "--output", str(samples), "--n", "2",
                     "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    assert train(tmp_path, "sft", samples)["data"]["data/examples"] == 8
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": g, "rejected": b}
                                                   for q, g, b in zip(QUESTIONS, GOOD, BAD)])
    train(tmp_path, "rm", pairs)
    capsys.readouterr()
    scored = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--reward-model", str(tmp_path / "rm_out"), "--data", pairs, "--output",
                     str(scored)]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(len(r["rewards"]) == 2 and r["chosen"] for r in rows)
    agreed = sum(r["rewards"][0] > r["rewards"][1] for r in rows)
    assert metrics["score/pairs"] == 4 and metrics["score/pair_accuracy"] == agreed / 4
    assert metrics["score/sequences"] == 8 and metrics["score/rows"] == 4


def test_tool_conversations_train_sft_with_a_template_that_renders_tools(tmp_path, capsys):
    from rlhfkit import models
    from tests.data.test_formats import TOOL_CONVERSATION, TOOL_TEMPLATE, WEATHER

    tok = models.load_tokenizer("tiny-llama")
    tok.chat_template = TOOL_TEMPLATE
    model_dir = tmp_path / "tool-model"
    models.load_causal_lm("tiny-llama", tokenizer=tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"messages": TOOL_CONVERSATION, "tools": [WEATHER]}] * 4
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    assert train(tmp_path, "sft", data, "--model", str(model_dir))["data"]["data/examples"] == 4
    # SmolLM2's template (tiny-llama's) renders no tools: one error naming the row, not a silent drop
    assert cli.main(["sft", *COMMON, "--data", data, "--output", str(tmp_path / "o")]) == 1
    assert f"error: {data}:1: the chat template of" in capsys.readouterr().err


def test_columns_named_otherwise_train_rm(tmp_path):
    rows = [{"question": q, "answers": [g, b], "ratings": [9, 2]} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    data = write_jsonl(tmp_path / "renamed.jsonl", rows)
    record = train(tmp_path, "rm", data, "--columns", "question=prompt", "answers=responses", "ratings=scores")
    assert record["data"]["data/examples"] == 4
