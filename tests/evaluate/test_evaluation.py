"""`rlhfkit eval` end to end on two tiny models, judged by the built-in task's gold score."""

from __future__ import annotations

import json
import operator

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
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == [t.family for t in eval_tasks]
    assert sum(r["scores"][a] for r in rows) / 12 == pytest.approx(result["models"][a]["mean_score"])
    assert sum((r["scores"][a] > r["scores"][b]) + 0.5 * (r["scores"][a] == r["scores"][b]) for r in rows) / 12 \
        == pytest.approx(wr[a][b]["win_rate"])
    won, lost, tied = (sum(f(r["scores"][a], r["scores"][b]) for r in rows)
                       for f in (operator.gt, operator.lt, operator.eq))
    assert (wr[a][b]["wins"], wr[a][b]["losses"], wr[a][b]["ties"]) == (won, lost, tied)
    assert f"| {a} | — | {won} / {lost} / {tied} |" in (out / "eval.md").read_text()


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


def test_response_logps_in_length_sorted_trimmed_batches_equal_each_row_alone(tok):
    # KL to the reference sums log π(y|x) over each response; rows are batched by length and each batch cut to
    # the columns it needs: every row's value must be what a plain forward over that row alone gives
    import torch

    from rlhfkit.evaluate.evaluation import response_logps
    from rlhfkit.rollout import SamplingParams
    from rlhfkit.rollout.hf import HFEngine

    lm = models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok).eval()
    prompts = [[{"role": "user", "content": p}] for p in ("Hi", "Name three fruits of the autumn, please.", "Why?",
                                                            "A much longer question, about the colour of the sky?")]
    engine = HFEngine(lm, tok, 8, stop_ids=range(6000))  # a random model: stop on an eighth of the vocabulary
    samples = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=0))
    assert len(set(samples.response_mask.sum(1).tolist())) > 1  # responses of several lengths
    expected = []
    for k in range(len(samples.texts)):  # one row, no padding: the definition
        p = samples.prompt_ids[k][samples.prompt_mask[k].bool()]
        r = samples.response_ids[k][samples.response_mask[k].bool()]
        with torch.no_grad():
            logits = lm(torch.cat([p, r])[None]).logits[0, len(p) - 1:-1].double()  # (|r|, V)
        expected.append(float(logits.log_softmax(-1).gather(1, r[:, None]).sum()))
    # a batch's rows share their common start (the chat template's header) as a prefix: that path is exercised
    heads = [samples.prompt_ids[k][samples.prompt_mask[k].bool()][:2].tolist() for k in range(len(samples.texts))]
    assert all(h == heads[0] for h in heads)
    for batch_size in (1, 3, 64):
        got = response_logps(lm, samples, batch_size, "no")
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4)
