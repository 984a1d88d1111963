"""`rlhfkit eval` end to end on two tiny models, judged by the built-in task's gold score."""

from __future__ import annotations

import json

import pytest

from rlhfkit import models
from rlhfkit.sim import tasks

from tests.conftest import run_cli


def test_eval_writes_win_rates_elo_scores_and_kl(tmp_path, tok):
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"m{seed}"
        models.load_causal_lm("tiny-llama", seed=seed, tokenizer=tok).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(str(d))
    out = tmp_path / "eval"
    run_cli("eval", "--models", *dirs, "--prompts", "sim:eval", "--limit", "12", "--max-new-tokens", "6",
            "--reference", dirs[0], "--output", str(out), "--dtype", "fp32", "--bootstrap", "100")
    result = json.loads((out / "eval.json").read_text())
    a, b = dirs
    assert result["prompts"] == 12
    wr = result["win_rates"]
    assert wr[a][b]["win_rate"] + wr[b][a]["win_rate"] == pytest.approx(1.0) and wr[a][b]["n"] == 12
    assert sum(result["elo"].values()) / 2 == pytest.approx(1000)
    assert result["models"][a]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # a model against itself
    assert result["models"][b]["kl_to_reference"] != 0
    eval_tasks = tasks.split("eval")[:12]
    families = {f"score/{t.family}" for t in eval_tasks}
    assert families <= set(result["models"][a])
    assert (out / "elo.png").is_file() and "| model | Elo" in (out / "eval.md").read_text()


def test_sim_judge_needs_task_prompts(tmp_path):
    proc = run_cli("eval", "--models", "tiny-llama", "--prompts", "sample:prompts", "--judge", "sim",
                   "--output", str(tmp_path / "e"), "--limit", "2", "--max-new-tokens", "2", check=False)
    assert proc.returncode != 0 and "--judge sim needs prompts of the built-in task" in proc.stderr


def test_responses_file_is_judged_like_a_model_and_labels_name_models(tmp_path):
    """A responses file holding the gold demonstrations beats a random tiny model on nearly every prompt."""
    import random

    suite = tasks.split("eval")[:10]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t.prompt},
                                                      {"role": "assistant",
                                                       "content": tasks.demonstration(t, random.Random(0))}]}) + "\n"
                             for t in suite))
    out = tmp_path / "eval"
    run_cli("eval", "--models", "tiny-llama", f"responses:{demos}", "--labels", "random", "demos",
            "--prompts", "sim:eval", "--limit", "10", "--max-new-tokens", "4", "--output", str(out),
            "--dtype", "fp32", "--bootstrap", "50")
    result = json.loads((out / "eval.json").read_text())
    assert set(result["models"]) == {"random", "demos"}
    gold = [tasks.gold_score(t, tasks.demonstration(t, random.Random(0))) for t in suite]
    assert result["models"]["demos"]["mean_score"] == pytest.approx(sum(gold) / len(gold))
    assert result["win_rates"]["demos"]["random"]["win_rate"] > 0.8
    short = tmp_path / "short.jsonl"
    short.write_text(demos.read_text().splitlines()[0] + "\n")
    proc = run_cli("eval", "--models", f"responses:{short}", "--prompts", "sim:eval", "--limit", "10",
                   "--output", str(tmp_path / "e2"), check=False)
    assert proc.returncode != 0 and "has no response for 9 of the 10 prompts" in proc.stderr
