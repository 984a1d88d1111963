"""Format detection and the errors a person sees for bad rows (file and line)."""

from __future__ import annotations

import json

import pytest

from rlhfkit import DataError
from rlhfkit.data import formats, io


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_malformed_json_names_file_and_line(tmp_path):
    p = write(tmp_path, "d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        io.read_rows(p)


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    good = json.dumps({"prompt": "hi", "completion": "ok"}).encode() + b"\n"
    (tmp_path / "latin1.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "completion": "ok"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        io.read_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "latin1.json").write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(DataError, match=r"latin1.json:3: not valid UTF-8 \(byte 0xff at column 13\)"):
        io.read_rows(tmp_path / "latin1.json")


def test_missing_column_names_line(tmp_path):
    p = write(tmp_path, "d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing column\(s\) completion"):
        formats.detect_format(io.read_rows(p))


def test_bad_role_and_missing_file(tmp_path):
    p = write(tmp_path, "c.jsonl", [json.dumps({"messages": [{"role": "robot", "content": "x"}]})])
    rows = io.read_rows(p)
    with pytest.raises(DataError, match=r"c\.jsonl:1: messages\[0\] has role 'robot'"):
        formats.to_conversation(rows[0], formats.detect_format(rows))
    with pytest.raises(DataError, match="data file not found"):
        io.read_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("ranking,msg", [([0, 1, 5], "out of range"), ([0, 0, 1], "repeats"),
                                         ([0, 1], "names 2 of 3")])
def test_invalid_rankings(ranking, msg):
    row = io.Row({"prompt": "p", "responses": ["a", "b", "c"], "ranking": ranking}, "r.jsonl:4")
    with pytest.raises(DataError, match=rf"r\.jsonl:4: .*{msg}"):
        formats.to_preference(row, "rankings")


def test_ranking_with_tie_gives_pairs_across_groups_only():
    row = io.Row({"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]}, "r:1")
    assert sorted(formats.to_preference(row, "rankings").pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])


def test_parquet_csv_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "hi", "completion": "hello"}, {"prompt": "yo", "completion": "hey"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "d_dir"))
    for path in ("d.parquet", "d.csv", "d_dir"):
        rows = io.read_rows(tmp_path / path)
        assert formats.detect_format(rows) == "prompt_completion"
        assert formats.to_conversation(rows[1], "prompt_completion").messages[-1]["content"] == "hey"
    assert io.read_rows(tmp_path / "d.csv")[1].where.endswith("d.csv:3")  # header is line 1


def test_unknown_columns():
    with pytest.raises(DataError, match="cannot tell the data format"):
        formats.detect_format([io.Row({"foo": 1}, "x:1")])


def test_every_command_reads_the_built_in_task_as_sim_split():
    from rlhfkit.sim import tasks

    rows = io.read_rows("sim:rl")
    assert len(rows) == len(tasks.split("rl")) and rows[0].where == "sim:rl:1"
    assert tasks.from_row(rows[0].data) == tasks.split("rl")[0]  # family and params ride along for the gold reward
    assert formats.to_prompt(rows[0], formats.detect_format(rows)).messages[-1]["role"] == "user"
    with pytest.raises(DataError, match=r"no built-in task split 'bogus'; available: sft, rm, rl, eval"):
        io.read_rows("sim:bogus")


# --- formats of other people's data -----------------------------------------------------------------------

# Anthropic HH rows (harmless-base) whose assistant turn holds an inline "Human:" without the blank line: the two
# transcripts part one turn before the chosen side's last "\n\nAssistant:"
HH_INLINE = {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water. Human: and then?"
                       "\n\nAssistant: Let it rise, then bake it.",
             "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water. Human: and yeast?"
                         "\n\nAssistant: No idea."}
# chosen and rejected part in the first human turn: no shared prompt at all
HH_UNSPLITTABLE = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Yo."}


def pref(data: dict, fmt: str | None = None, **kw) -> formats.Preference:
    row = io.Row(data, "f.jsonl:7")
    return formats.to_preference(row, fmt or formats.format_of(row), **kw)


def test_hh_prompt_is_the_longest_shared_prefix_ending_at_an_assistant_turn():
    p = pref(HH_INLINE)
    assert p.prompt == [{"role": "user", "content": "How do I bake bread?"}]
    # the rest of each transcript is the response, turn by turn (the inline "Human:" is no turn)
    assert p.responses[0] == [{"role": "assistant", "content": "Mix flour and water. Human: and then?"},
                              {"role": "assistant", "content": "Let it rise, then bake it."}]
    assert p.responses[1][-1] == {"role": "assistant", "content": "No idea."}
    # a transcript that goes on after the parting turn keeps its later turns as part of the response
    later = pref({"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y",
                  "rejected": "\n\nHuman: A\n\nAssistant: z"})
    assert later.prompt == [{"role": "user", "content": "A"}]
    assert [m["role"] for m in later.responses[0]] == ["assistant", "user", "assistant"]


def test_an_hh_pair_without_a_shared_prompt_names_its_line():
    with pytest.raises(DataError, match=r"^f\.jsonl:7: chosen and rejected share no prefix that ends at an "
                                        r"'\\n\\nAssistant:' turn \(they differ from character 10\)$"):
        pref(HH_UNSPLITTABLE)


def test_skip_invalid_counts_the_rows_and_keeps_the_first_errors(tmp_path):
    rows = [HH_INLINE, HH_UNSPLITTABLE, HH_INLINE] + [HH_UNSPLITTABLE] * 6
    p = write(tmp_path, "hh.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"hh\.jsonl:2: chosen and rejected share no prefix"):
        formats.read(str(p), formats.to_preference)
    skipped = formats.Skipped()
    prefs, kept = formats.read(str(p), formats.to_preference, skipped=skipped)
    assert [r.where for r in kept] == [f"{p}:1", f"{p}:3"] and len(prefs) == 2
    assert skipped.count == 7 and len(skipped.first) == formats.Skipped.SHOWN
    assert skipped.first[0].startswith(f"{p}:2: chosen and rejected share no prefix")
    with pytest.raises(DataError, match=r"no valid rows \(1 skipped as invalid"):
        formats.read(str(write(tmp_path, "bad.jsonl", [json.dumps(HH_UNSPLITTABLE)])), formats.to_preference,
                     skipped=formats.Skipped())


SYSTEM = {"role": "system", "content": "Be kind."}
USER = {"role": "user", "content": "Name a colour."}


def said(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def test_implicit_prompt_pairs_split_at_the_last_shared_turn_before_an_assistant():
    chosen = [SYSTEM, USER, said("assistant", "Blue."), said("user", "Another?"), said("assistant", "Green.")]
    rejected = chosen[:4] + [said("assistant", "No.")]
    p = pref({"chosen": chosen, "rejected": rejected})
    assert formats.format_of(io.Row({"chosen": chosen, "rejected": rejected}, "x")) == "implicit_pairs"
    assert p.prompt == chosen[:4] and p.responses == [[chosen[4]], [rejected[4]]]
    with pytest.raises(DataError, match=r"f\.jsonl:7: chosen and rejected share no prompt"):
        pref({"chosen": [USER, said("assistant", "a")], "rejected": [said("user", "Other?"), said("assistant", "b")]})


def test_h4_layout_strips_the_prompt_the_responses_repeat():
    p = pref({"prompt": "Name a colour.", "chosen": [USER, said("assistant", "Blue.")],
              "rejected": [USER, said("assistant", "No.")]})
    assert p.prompt == [USER] and p.responses == [[said("assistant", "Blue.")], [said("assistant", "No.")]]
    with pytest.raises(DataError, match="chosen starts with a user turn but does not repeat the prompt"):
        pref({"prompt": "Something else.", "chosen": [USER, said("assistant", "Blue.")], "rejected": "No."})


def test_sharegpt_conversations_and_preferences():
    turns = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Name a colour."},
             {"from": "gpt", "value": "Blue."}]
    row = io.Row({"conversations": turns}, "s.jsonl:1")
    assert formats.format_of(row) == "sharegpt"
    assert formats.to_conversation(row, "sharegpt").messages == [SYSTEM, USER, said("assistant", "Blue.")]
    assert formats.to_prompt(row, "sharegpt").messages == [SYSTEM, USER]
    p = pref({"conversations": turns[:2], "chosen": {"from": "gpt", "value": "Blue."},
              "rejected": {"from": "gpt", "value": "No."}})
    assert p.prompt == [SYSTEM, USER] and p.responses[1] == [said("assistant", "No.")]
    with pytest.raises(DataError, match=r"conversations\[0\] is from 'robot'; expected one of system, human"):
        formats.to_conversation(io.Row({"conversations": [{"from": "robot", "value": "x"}]}, "s:2"), "sharegpt")


def test_scores_give_rankings_with_ties_and_a_minimum_gap():
    data = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [7, 9, 7, 8.5]}
    assert pref(data).pairs == [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2)]  # 0 and 2 tie: no pair
    gapped = pref(data, min_score_gap=1.0)
    assert gapped.pairs == [(1, 0), (1, 2), (3, 0), (3, 2)] and gapped.below_score_gap == 1
    completions = {"prompt": "p", "completions": [{"response": "a", "overall_score": 3},
                                                  {"response": "b", "overall_score": 9}]}
    assert formats.format_of(io.Row(completions, "x")) == "scored_completions"
    assert pref(completions).pairs == [(1, 0)]
    completions["completions"][0]["overall_score"] = "N/A"
    with pytest.raises(DataError, match=r"f\.jsonl:7: completions\[0\]\.overall_score must be a finite number"):
        pref(completions)
    with pytest.raises(DataError, match=r"f\.jsonl:7: scores must be a list of 4 numbers"):
        pref({**data, "scores": [1, 2]})
    with pytest.raises(DataError, match=r"scores\[1\] must be a finite number, got 'N/A'"):
        pref({**data, "scores": [1, "N/A", 2, 3]})


def test_two_formats_of_one_kind_fitting_a_row_is_an_error_naming_both():
    both = io.Row({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 2]}, "b.jsonl:1")
    with pytest.raises(DataError, match=r"b\.jsonl:1: .* fit more than one format: rankings \(prompt, responses, "
                                        r"ranking\) and scored \(prompt, responses, scores\); name the one meant"):
        formats.format_of(both)
    assert formats.format_of(both, "scored") == "scored"
    # across kinds the comparison wins (H4 files carry messages beside prompt/chosen/rejected), and a structured
    # format wins over a rendered text column (Alpaca files)
    assert formats.format_of(io.Row({"prompt": "p", "chosen": "a", "rejected": "b", "messages": []}, "x")) == "pairs"
    assert formats.format_of(io.Row({"instruction": "i", "input": "", "output": "o", "text": "t"}, "x")) == "alpaca"


def test_plain_text_rows_are_trained_whole_and_hh_text_stays_hh(tok):
    from rlhfkit.data import chat

    plain = io.Row({"text": "Once upon a time there was a cat."}, "t.jsonl:1")
    assert formats.format_of(plain) == "text"
    assert formats.format_of(io.Row({"text": "\n\nHuman: Hi\n\nAssistant: Hello."}, "x")) == "hh_text"
    conv = formats.to_conversation(plain, "text")
    (ex,), report = chat.tokenize_conversations(tok, [conv], 512)
    assert ex.input_ids == tok(conv.text)["input_ids"] + [tok.eos_token_id]
    assert ex.loss_mask == [0] + [1] * (len(ex.input_ids) - 1) and report.examples == 1
    with pytest.raises(DataError, match="plain text has no prompt"):
        formats.to_prompt(plain, "text")


def test_content_parts_are_joined_and_other_parts_refused():
    parts = [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}]
    row = io.Row({"messages": [{"role": "user", "content": parts}, said("assistant", "Blue.")]}, "c.jsonl:2")
    assert formats.to_conversation(row, "conversations").messages[0] == USER
    image = io.Row({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}, "c.jsonl:3")
    with pytest.raises(DataError, match=r"c\.jsonl:3: messages\[0\]\.content\[0\] is a content part of type 'image'"):
        formats.to_conversation(image, "conversations")


def test_a_label_column_is_refused_never_ignored():
    row = io.Row({"prompt": "p", "completion": "c", "label": False}, "k.jsonl:4")
    assert formats.format_of(row) == "unpaired"
    for convert in (formats.to_conversation, formats.to_preference):
        with pytest.raises(DataError, match=r"^k\.jsonl:4: the column 'label' holds unpaired feedback"):
            convert(row, "unpaired")
    with pytest.raises(DataError, match="the column 'label'"):  # whatever the format says
        formats.to_conversation(io.Row({"messages": [USER, said("assistant", "x")], "label": True}, "k:5"),
                                "conversations")


def test_gzipped_json_lines_and_json_lines_in_a_json_file(tmp_path):
    import gzip

    import datasets

    lines = [json.dumps({"prompt": "a", "completion": "b"}), '{"prompt": "a", "completion": ']
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:2: not valid JSON"):
        io.read_rows(tmp_path / "d.jsonl.gz")
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(b'[{"prompt": "a"}, {"prompt": "b"}]'))
    assert [r.data["prompt"] for r in io.read_rows(tmp_path / "d.json.gz")] == ["a", "b"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: not a readable gzip file"):
        io.read_rows(tmp_path / "bad.jsonl.gz")
    ds = datasets.Dataset.from_list([{"prompt": "hi", "completion": "hello"}, {"prompt": "yo", "completion": "hey"}])
    ds.to_json(str(tmp_path / "lines.json"))  # JSON Lines, though named .json
    rows = io.read_rows(tmp_path / "lines.json")
    assert [r.where for r in rows] == [f"{tmp_path / 'lines.json'}:1", f"{tmp_path / 'lines.json'}:2"]
    assert rows[1].data == {"prompt": "yo", "completion": "hey"}


def oasst(role: str, text: str, rank: int | None = None, replies: list | None = None, **kw) -> dict:
    """A message of an OpenAssistant tree export (oasst_data's ExportMessageNode, the fields read here)."""
    return {"message_id": text[:8], "role": role, "text": text, "rank": rank, "replies": replies or [], "lang": "en",
            **kw}


# Q has two ranked answers (a deleted and an unranked one are not compared); the best one's follow-up question Q2
# has three, two of them tied for first
OASST_TREE = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": oasst("prompter", "Q", replies=[
    oasst("assistant", "A second", 1),
    oasst("assistant", "A first", 0, [oasst("prompter", "Q2", replies=[
        oasst("assistant", "B tied", 0), oasst("assistant", "B last", 1), oasst("assistant", "B tied too", 0)])]),
    oasst("assistant", "A deleted", 2, deleted=True),
    oasst("assistant", "A unranked")])}


def test_openassistant_trees_give_a_ranking_per_ranked_set_of_replies(tmp_path, capsys):
    lonely = {"message_tree_id": "t2", "prompt": oasst("prompter", "Hi", replies=[oasst("assistant", "Hello", 0)])}
    data = write(tmp_path, "oasst.trees.jsonl", [json.dumps(OASST_TREE), json.dumps(lonely)])
    prefs, rows = formats.read(str(data), formats.to_preference)
    assert formats.format_of(io.Row(OASST_TREE, "x")) == "oasst_trees"
    assert [p.where for p in prefs] == [f"{data}:1 (message Q)", f"{data}:1 (message Q2)"]
    first, second = prefs
    assert first.prompt == [said("user", "Q")]
    assert first.responses == [[said("assistant", "A first")], [said("assistant", "A second")]]
    assert first.pairs == [(0, 1)]
    assert second.prompt == [said("user", "Q"), said("assistant", "A first"), said("user", "Q2")]
    assert [r[0]["content"] for r in second.responses] == ["B tied", "B tied too", "B last"]
    assert second.pairs == [(0, 2), (1, 2)]  # the tie gives no pair
    assert rows[1].data["ranking"] == [[0, 1], 2]
    # the tree without a ranking is said, not hidden
    assert f"data: {data}: 1 of 2 OpenAssistant trees hold no ranking" in capsys.readouterr().err
    # as demonstrations, each ranking gives its best reply after its thread
    convs, _ = formats.read(str(data), formats.to_conversation)
    assert convs[1].messages == second.prompt + [said("assistant", "B tied")]
    only_lonely = write(tmp_path, "lonely.jsonl", [json.dumps(lonely)])
    with pytest.raises(DataError, match=r"lonely\.jsonl: no rows to train on"):
        formats.read(str(only_lonely), formats.to_preference)
    bad = {**OASST_TREE, "prompt": oasst("robot", "Q")}
    with pytest.raises(DataError, match=r"b\.jsonl:1 \(message Q\): a message of an OpenAssistant tree must be"):
        formats.read(str(write(tmp_path, "b.jsonl", [json.dumps(bad)])), formats.to_preference)


def test_prompt_response_rows_are_demonstrations_as_generate_writes_them():
    row = io.Row({"prompt": [USER], "response": "Blue.", "finished": True, "sample_index": 0}, "g.jsonl:1")
    assert formats.format_of(row) == "prompt_response"
    assert formats.to_conversation(row, "prompt_response").messages == [USER, said("assistant", "Blue.")]


def test_columns_rename_a_files_own_names(tmp_path):
    rows = [{"question": "p", "answers": ["a", "b"], "ratings": [1, 2]},
            {"question": "p", "completions": [{"response": "a", "fine-grained_score": 3},
                                              {"response": "b", "fine-grained_score": 1}]}]
    scored = write(tmp_path, "s.jsonl", [json.dumps(rows[0])])
    (p,), _ = formats.read(str(scored), formats.to_preference,
                           columns=["question=prompt", "answers=responses", "ratings=scores"])
    assert p.pairs == [(1, 0)]
    completions = write(tmp_path, "c.jsonl", [json.dumps(rows[1])])
    (p,), _ = formats.read(str(completions), formats.to_preference,
                           columns=["question=prompt", "fine-grained_score=overall_score"])
    assert p.pairs == [(0, 1)]
    with pytest.raises(DataError, match="cannot tell the data format"):
        formats.read(str(scored), formats.to_preference)
    from rlhfkit import UsageError
    with pytest.raises(UsageError, match=r"--columns 'ratings': expected FILE_COLUMN=RLHFKIT_COLUMN"):
        formats.read(str(scored), formats.to_preference, columns=["ratings"])
    with pytest.raises(DataError, match=r"s\.jsonl:1: --columns question=prompt answers=prompt gives two of the "):
        formats.read(str(scored), formats.to_preference, columns=["question=prompt", "answers=prompt"])


def test_a_hub_data_set_name_says_how_to_read_it_locally():
    with pytest.raises(DataError, match=r"'Anthropic/hh-rlhf' looks like a Hugging Face hub data set: rlhfkit reads "
                                        r"local data only, so save it first \(datasets\.load_dataset"):
        io.read_rows("Anthropic/hh-rlhf")
    with pytest.raises(DataError, match=r"data file not found: missing/file\.jsonl$"):
        io.read_rows("missing/file.jsonl")


# a tool-using template in the style of Qwen2.5's: function schemas in the system turn, calls as JSON, results as
# tool turns; applied to tiny-llama's tokenizer (SmolLM2's own template renders neither tools nor calls)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
TOOL_CONVERSATION = [said("user", "Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "content": "Sunny, 21 C", "name": "weather"},
                     said("assistant", "It is sunny and 21 C in Paris.")]


def test_tool_messages_render_through_the_template_and_only_assistant_turns_train(tok):
    import copy

    from rlhfkit import TemplateError
    from rlhfkit.data import chat

    row = io.Row({"messages": TOOL_CONVERSATION, "tools": json.dumps([WEATHER])}, "t.jsonl:1")
    conv = formats.to_conversation(row, "conversations")
    assert conv.tools == [WEATHER] and conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert conv.messages[2] == {"role": "tool", "content": "Sunny, 21 C", "name": "weather"}
    tool_tok = copy.deepcopy(tok)
    tool_tok.chat_template = TOOL_TEMPLATE
    ex = chat.tokenize_conversation(tool_tok, conv.messages, conv.where, tools=conv.tools)
    text = lambda mask: tool_tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m == mask])  # noqa: E731
    assert text(1) == ('<call>{"name": "weather", "arguments": {"city": "Paris"}}</call><|im_end|>'
                       "It is sunny and 21 C in Paris.<|im_end|>")
    assert "Tools: " in text(0) and "Sunny, 21 C" in text(0) and "Weather in Paris?" in text(0)
    # a template that renders neither is an error, not a silent drop
    with pytest.raises(TemplateError, match=r"t\.jsonl:1: the chat template of .* does not render the 'tools' column"):
        chat.tokenize_conversation(tok, conv.messages, conv.where, tools=conv.tools)
    with pytest.raises(TemplateError, match=r"t\.jsonl:1: the chat template of .* does not render tool_calls"):
        chat.tokenize_conversation(tok, conv.messages, conv.where)
    # comparisons and prompts are not rendered with tools: the column is refused there
    pairs = io.Row({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [WEATHER]}, "p.jsonl:2")
    with pytest.raises(DataError, match=r"p\.jsonl:2: the column 'tools' is read for SFT conversations only"):
        formats.to_preference(pairs, "pairs")
    with pytest.raises(DataError, match=r"tool_calls must be a list, on an assistant message"):
        formats.to_conversation(io.Row({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "x"),
                                "conversations")


def test_llama_factory_sharegpt_function_calls_and_observations():
    turns = [{"from": "human", "value": "Weather in Paris?"},
             {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
             {"from": "observation", "value": "Sunny"}, {"from": "gpt", "value": "Sunny."}]
    conv = formats.to_conversation(io.Row({"conversations": turns, "tools": "[]"}, "l.jsonl:1"), "sharegpt")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"] and conv.tools is None
