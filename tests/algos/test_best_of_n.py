"""rlhfkit best-of-n on the tiny model: n=1 is plain sampling, the best beats the first, the outputs are SFT and
DPO data, RM scores are `rlhfkit score`'s, reward functions get metadata and sum with the RM, ties are counted."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from rlhfkit import UsageError
from rlhfkit.algos import best_of_n, generate, reward, score
from rlhfkit.data import formats, io

from tests.conftest import run_cli

# each prompt row carries a column ("bonus") that only a reward function reading the metadata can see
PROMPTS = [{"prompt": "How do I make pancakes?", "bonus": 0},
           {"prompt": "What is 48 divided by 4?", "bonus": 100},
           {"messages": [{"role": "user", "content": "Name a colour."}], "bonus": 200},
           {"prompt": "Write a haiku about rain.", "bonus": 300}]

REWARDS = '''
def length(prompts, responses, metadata):
    """Longer is better, plus the prompt row's bonus column."""
    return [len(r) + m["bonus"] for r, m in zip(responses, metadata)]


def constant(prompts, responses, metadata):
    return [1.0] * len(responses)
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A prompt file, a reward-function module (bon_rewards.py) and a tiny reward model trained for 2 steps."""
    d = tmp_path_factory.mktemp("bon")
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (d / "bon_rewards.py").write_text(textwrap.dedent(REWARDS))
    reward.train(reward.RMConfig(model="tiny-llama", data="sample:pairs", output=str(d / "rm"), max_steps=2,
                                 batch_size=4, lr=1e-3, val_fraction=0.0, warmup_ratio=0.0, dtype="fp32",
                                 max_length=256, normalize_std=True))  # an offset and a scale to apply
    return {"dir": str(d), "prompts": str(d / "prompts.jsonl"), "rm": str(d / "rm"),
            "length": f"{d / 'bon_rewards.py'}:length", "constant": f"{d / 'bon_rewards.py'}:constant"}


def cfg(files, tmp_path: Path, **kw) -> best_of_n.BestOfNConfig:
    defaults = dict(policy="tiny-llama", prompts=files["prompts"], output=str(tmp_path / "best.jsonl"), n=4,
                    max_new_tokens=8, dtype="fp32", batch_size=8, seed=0)
    defaults.update(kw)
    return best_of_n.BestOfNConfig(**defaults)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_n1_reproduces_plain_sampling_and_sample_0_of_any_n_too(files, tmp_path):
    common = dict(prompts=files["prompts"], max_new_tokens=8, dtype="fp32", seed=11, temperature=0.9, top_p=0.95)
    generate.generate(generate.GenerateConfig(model="tiny-llama", output=str(tmp_path / "plain.jsonl"), **common))
    plain = [r["response"] for r in read_jsonl(tmp_path / "plain.jsonl")]
    best_of_n.best_of_n(cfg(files, tmp_path, n=1, reward_fn=files["length"], **common))
    assert [r["messages"][-1]["content"] for r in read_jsonl(tmp_path / "best.jsonl")] == plain
    best_of_n.best_of_n(cfg(files, tmp_path, n=4, reward_fn=files["length"], batch_size=3,
                            samples_output=str(tmp_path / "all.jsonl"), **common))
    assert [r["response"] for r in read_jsonl(tmp_path / "all.jsonl") if r["sample_index"] == 0] == plain


def test_best_and_first_scores_and_outputs_load_as_sft_and_dpo_data(files, tmp_path):
    final = best_of_n.best_of_n(cfg(files, tmp_path, reward_model=files["rm"],
                                    samples_output=str(tmp_path / "all.jsonl")))
    samples = read_jsonl(tmp_path / "all.jsonl")
    by_prompt = [[s for s in samples if s["prompt_index"] == i] for i in range(len(PROMPTS))]
    assert final["bon/score_best"] == pytest.approx(sum(max(s["score"] for s in g) for g in by_prompt) / 4)
    assert final["bon/score_first"] == pytest.approx(sum(g[0]["score"] for g in by_prompt) / 4)
    assert final["bon/kl"] == pytest.approx(math.log(4) - 3 / 4)
    # SFT: every prompt once, with its best sample, through rlhfkit's own SFT loader
    convs = formats.read(str(tmp_path / "best.jsonl"), formats.to_conversation)[0]
    assert len(convs) == len(PROMPTS)
    for conv, group in zip(convs, by_prompt):
        best = max(group, key=lambda s: s["score"])
        assert conv.messages == best["prompt"] + [{"role": "assistant", "content": best["response"]}]
    # DPO: best vs worst, detected as pairs and readable as preferences
    rows = io.read_rows(tmp_path / "best.pairs.jsonl")
    assert formats.detect_format(rows) == "pairs"
    assert len(rows) + final["bon/pairs_skipped_tied"] + final["bon/pairs_skipped_identical"] == len(PROMPTS)
    for row in rows:
        pref = formats.to_preference(row, "pairs")
        group = by_prompt[row.data["prompt_index"]]
        assert pref.pairs == [(0, 1)] and pref.prompt == group[0]["prompt"]
        assert pref.responses[0][0]["content"] == max(group, key=lambda s: s["score"])["response"]
        assert pref.responses[1][0]["content"] == min(group, key=lambda s: s["score"])["response"]
        assert row.data["chosen_score"] > row.data["rejected_score"]
    record = json.loads((tmp_path / "best.run.json").read_text())
    assert record["command"] == "best-of-n" and record["final_metrics"]["bon/kl"] == final["bon/kl"]


def test_reward_model_scores_are_rlhfkit_scores(files, tmp_path):
    best_of_n.best_of_n(cfg(files, tmp_path, reward_model=files["rm"], samples_output=str(tmp_path / "all.jsonl")))
    score.score(score.ScoreConfig(reward_model=files["rm"], data=str(tmp_path / "all.jsonl"),
                                  output=str(tmp_path / "scored.jsonl")))
    for row in read_jsonl(tmp_path / "scored.jsonl"):
        assert row["score_rm"] == pytest.approx(row["reward"], abs=1e-5)  # normalised, like `rlhfkit score`


def test_cli_reward_fn_by_module_name_gets_metadata_and_sums_with_the_reward_model(files, tmp_path):
    out = tmp_path / "best.jsonl"
    run_cli("best-of-n", "--policy", "tiny-llama", "--reward-model", files["rm"], "--reward-fn", "bon_rewards:length",
            "--prompts", files["prompts"], "--n", "3", "--max-new-tokens", "6", "--dtype", "fp32",
            "--output", str(out), "--samples-output", str(tmp_path / "all.jsonl"),
            env={"PYTHONPATH": files["dir"], "OMP_NUM_THREADS": "1"})
    samples = read_jsonl(tmp_path / "all.jsonl")
    for s in samples:
        assert s["score_fn"] == len(s["response"]) + PROMPTS[s["prompt_index"]]["bonus"]
        assert s["score"] == pytest.approx(s["score_rm"] + s["score_fn"])
    for row in read_jsonl(out):
        group = [s for s in samples if s["prompt_index"] == row["prompt_index"]]
        assert row["score"] == max(s["score"] for s in group)
    record = json.loads((tmp_path / "best.run.json").read_text())
    assert record["config"]["reward_fn"] == "bon_rewards:length"


def test_tied_best_and_worst_give_no_pair_and_are_counted(files, tmp_path):
    final = best_of_n.best_of_n(cfg(files, tmp_path, reward_fn=files["constant"]))
    assert final["bon/pairs"] == 0 and final["bon/pairs_skipped_tied"] == len(PROMPTS)
    assert read_jsonl(tmp_path / "best.pairs.jsonl") == []
    assert [r["sample_index"] for r in read_jsonl(tmp_path / "best.jsonl")] == [0] * len(PROMPTS)  # first on ties


@pytest.mark.parametrize("kw,msg", [
    (dict(), "needs --reward-model DIR, --reward-fn"),
    (dict(reward_fn="no_such_module_xyz:f"), "cannot import 'no_such_module_xyz'"),
    (dict(reward_fn="nocolon"), "expected module:function"),
    (dict(reward_fn="LENGTH_FILE:missing"), "has no function 'missing'"),
])
def test_scorer_errors_are_clear_and_come_before_sampling(files, tmp_path, kw, msg):
    kw = {k: v.replace("LENGTH_FILE", files["length"].rpartition(":")[0]) for k, v in kw.items()}
    with pytest.raises(UsageError, match=msg):
        best_of_n.best_of_n(cfg(files, tmp_path, prompts="/nonexistent/prompts.jsonl", **kw))


def test_reward_fn_returning_the_wrong_count_is_an_error(files, tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def short(prompts, responses, metadata):\n    return [0.0]\n")
    with pytest.raises(UsageError, match="returned 1 values for 8 responses"):
        best_of_n.best_of_n(cfg(files, tmp_path, n=2, reward_fn=f"{bad}:short"))
