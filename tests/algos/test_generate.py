"""rlhfkit generate on the tiny model: one row per sample with its settings, the run record, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.algos import generate

from tests.conftest import run_cli

PROMPTS = [{"prompt": "How do I make pancakes?"}, {"prompt": "What is 48 divided by 4?"},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]}]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_writes_one_row_per_sample_with_the_settings_and_a_run_record(tmp_path):
    out = tmp_path / "gen" / "samples.jsonl"
    run_cli("generate", "--model", "tiny-llama", "--prompts", write_prompts(tmp_path), "--output", str(out),
            "--n", "2", "--temperature", "0.9", "--top-p", "0.95", "--max-new-tokens", "6", "--seed", "4",
            "--batch-size", "3", "--dtype", "fp32", env={"OMP_NUM_THREADS": "1"})
    rows = read_jsonl(out)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert rows[0]["prompt"] == [{"role": "user", "content": "How do I make pancakes?"}]
    assert rows[4]["prompt"] == PROMPTS[2]["messages"]
    assert rows[0]["generation"] == {"model": "tiny-llama", "n": 2, "temperature": 0.9, "top_p": 0.95,
                                     "max_new_tokens": 6, "seed": 4}
    assert all(isinstance(r["response"], str) and isinstance(r["finished"], bool) for r in rows)
    assert all(r["finished"] or r["response_tokens"] == 6 for r in rows)
    record = json.loads((tmp_path / "gen" / "samples.run.json").read_text())
    assert record["command"] == "generate" and record["seed"] == 4 and record["config"]["n"] == 2
    assert record["final_metrics"]["rollout/samples"] == 6
    assert 0 < record["final_metrics"]["rollout/length"] <= 6


def test_same_seed_same_file_other_seed_other_samples(tmp_path):
    base = dict(model="tiny-llama", prompts=write_prompts(tmp_path), max_new_tokens=6, dtype="fp32", n=2)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate.generate(generate.GenerateConfig(**base, seed=seed, output=str(tmp_path / f"{name}.jsonl")))
        runs[name] = [r["response"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert runs["a"] == runs["b"]
    assert all(x != y for x, y in zip(runs["a"], runs["c"]))


def test_samples_do_not_depend_on_batch_size(tmp_path):
    base = dict(model="tiny-llama", prompts=write_prompts(tmp_path), max_new_tokens=6, dtype="fp32", n=2, seed=0)
    generate.generate(generate.GenerateConfig(**base, batch_size=6, output=str(tmp_path / "six.jsonl")))
    generate.generate(generate.GenerateConfig(**base, batch_size=1, output=str(tmp_path / "one.jsonl")))
    assert read_jsonl(tmp_path / "six.jsonl") == read_jsonl(tmp_path / "one.jsonl")
