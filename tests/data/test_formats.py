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
