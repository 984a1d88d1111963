"""`rlhfkit pipeline --preset tiny`: the whole recipe end to end on tiny-llama, its report, and reruns that skip."""

from __future__ import annotations

import json
import random
import re

import pytest

from rlhfkit import UsageError
from rlhfkit.core import rl
from rlhfkit.evaluate import report
from rlhfkit.config import from_dict
from rlhfkit.pipeline import PipelineConfig, resolve, slots
from rlhfkit.sim import tasks
from rlhfkit.tracking import read_metrics

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = run_cli("pipeline", "--preset", "tiny", "--context-distill", "--output", str(out), timeout=600)
    return out, proc


def test_tiny_pipeline_runs_every_stage_and_writes_the_report(tiny_run):
    out, proc = tiny_run
    for stage in ("data", "distill", "sft", "comparisons", "rm", "comparisons_heldout", "rm_heldout", "ppo", "dpo",
                  "best_of_n", "eval"):
        assert json.loads((out / stage / "stage.json").read_text())["key"], stage
    # SFT started from the context-distilled model, distilled on the SFT prompts
    assert json.loads((out / "sft" / "run.json").read_text())["config"]["model"] == str(out / "distill")
    assert json.loads((out / "distill" / "run.json").read_text())["config"]["prompts"] == str(out / "data" / "sft.jsonl")
    # comparisons: K ranked responses per RM prompt, a labeller id each, indices forming a valid ranking
    rows = [json.loads(line) for line in (out / "comparisons" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["responses"]) == 3 for r in rows)
    for r in rows:
        flat = sorted(i for g in r["ranking"] for i in (g if isinstance(g, list) else [g]))
        assert flat == [0, 1, 2] and r["labeller"].startswith("L")
        assert r["gold"] == [tasks.gold_score(tasks.from_row(r), t) for t in r["responses"]]
    # the held-out RM's comparisons: the same prompts, other samples (another seed)
    held = [json.loads(line) for line in (out / "comparisons_heldout" / "rankings.jsonl").read_text().splitlines()]
    assert [h["prompt"] for h in held] == [r["prompt"] for r in rows]
    assert all(h["responses"] != r["responses"] for h, r in zip(held, rows))
    # PPO logged the gold score and the held-out RM beside its own proxy, every iteration
    ppo_rows = read_metrics(out / "ppo")
    assert len(ppo_rows) == 3 and all("monitor/gold_reward" in m and "monitor/rm_rm_heldout" in m for m in ppo_rows)
    # and the over-optimisation alarms (3 iterations are too few for the default window of 3: none raised)
    assert all(m[f"watch/{kind}"] == 0 for m in ppo_rows for kind in rl.ALARMS)
    # evaluation: every model, the round's policy included, with Elo and win rates
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert list(ev["models"]) == ["base", "sft", "best-of-4", "dpo", "ppo"]
    assert ev["prompts"] == 16 and sum(ev["elo"].values()) / 5 == pytest.approx(1000)
    md = (out / "report.md").read_text()
    for heading in ("Results on held-out prompts", "Helpful and harmless", "Reward model", "Over-optimisation",
                    "Is reward linear in √KL?", "Over-optimisation alarms", "Training curves"):
        assert f"## {heading}" in md
    assert re.search(r"\| rm \| \d\.\d{3} \(\d\.\d{3}–\d\.\d{3}\) \| [1-9]\d* \|", md)  # accuracy, interval, pairs
    vs_sft = ev["win_rates"]["ppo"]["sft"]  # its games against SFT, won / lost / tied, after the win rate
    assert f"–{vs_sft['hi']:.3f}) | {vs_sft['wins']} / {vs_sft['losses']} / {vs_sft['ties']} |" in md
    assert vs_sft["wins"] + vs_sft["losses"] + vs_sft["ties"] == 16
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<script" not in page
    for png in ("reward_vs_sqrt_kl.png", "training_curves.png", "eval/elo.png", "rm/reliability.png"):
        assert (out / png).stat().st_size > 1000
    record = json.loads((out / "run.json").read_text())
    assert record["final_metrics"]["elo/ppo"] == ev["elo"]["ppo"]
    # the machine's speed before and after, so that the stage times can be compared between runs
    speed = record["machine_speed"]
    assert set(speed) == {"matmul_dtype", "matmul_gflops_start", "matmul_gflops_end"}
    assert speed["matmul_dtype"] in ("bf16", "fp32")
    assert speed["matmul_gflops_start"] > 0 and speed["matmul_gflops_end"] > 0
    assert f"{speed['matmul_gflops_end']:.0f} after the last" in md


@pytest.mark.slow  # the default run keeps the tiny pipeline without online rounds
def test_an_online_round_samples_new_comparisons_retrains_and_is_evaluated(tmp_path):
    out = tmp_path / "run"
    run_cli("pipeline", "--preset", "tiny", "--online-rounds", "1", "--output", str(out), timeout=900)
    for stage in ("round1/comparisons", "round1/rm", "round1/ppo", "eval"):
        assert json.loads((out / stage / "stage.json").read_text())["key"], stage
    # the round's comparisons come from the newest policy and its RM trains on old and new ones together
    new = [json.loads(x) for x in (out / "round1" / "comparisons" / "rankings.jsonl").read_text().splitlines()]
    assert len(new) == 24
    # with one rival, PPO and SFT take turns within each ranking (K = 3: two of one, one of the other)
    assert all(sorted(x["models"]) in (["ppo", "ppo", "sft"], ["ppo", "sft", "sft"]) for x in new)
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert list(ev["models"]) == ["base", "sft", "best-of-4", "dpo", "ppo", "ppo-round1"]
    md = (out / "report.md").read_text()
    assert "| ppo-round1 |" in md and "| 1 | ppo, sft | 24 (" in md
    assert "## Elo from the simulated labellers, round by round" in md and "| after round 1 | 48 |" in md


def test_rerun_skips_complete_stages_and_a_changed_stage_reruns_with_what_follows(tiny_run):
    out, _ = tiny_run
    before = (out / "eval" / "eval.json").read_text()
    stages = ("data", "distill", "sft", "comparisons", "rm", "dpo", "best_of_n", "eval")
    written = {s: (out / s / "stage.json").stat().st_mtime_ns for s in stages}
    proc = run_cli("pipeline", "--preset", "tiny", "--context-distill", "--output", str(out), "--skip", "ppo",
                   check=False)
    # skipping ppo changes the evaluated models: data..dpo are reused (their records untouched), eval reruns
    assert proc.returncode == 0, proc.stderr
    again = {s: (out / s / "stage.json").stat().st_mtime_ns for s in stages}
    assert [s for s in stages if again[s] != written[s]] == ["eval"]
    assert (out / "eval" / "eval.json").read_text() != before
    assert "ppo" not in json.loads((out / "eval" / "eval.json").read_text())["models"]


def test_rl_baselines_run_beside_ppo_as_report_rows(tiny_run):
    out, _ = tiny_run
    stages = ("data", "sft", "comparisons", "rm", "ppo", "dpo", "best_of_n")
    written = {s: (out / s / "stage.json").stat().st_mtime_ns for s in stages}
    run_cli("pipeline", "--preset", "tiny", "--context-distill", "--output", str(out), "--rl-baselines", "grpo")
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in stages} == written  # PPO's own run reused
    variant = json.loads((out / "ppo_grpo" / "run.json").read_text())["config"]
    ppo = json.loads((out / "ppo" / "run.json").read_text())["config"]
    assert (ppo["advantage"], variant["advantage"]) == ("gae", "grpo")
    assert {k: v for k, v in variant.items() if k not in ("advantage", "output")} == \
        {k: v for k, v in ppo.items() if k not in ("advantage", "output")}
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert list(ev["models"]) == ["base", "sft", "best-of-4", "dpo", "ppo", "ppo-grpo"]
    assert "| ppo-grpo |" in (out / "report.md").read_text()


@pytest.mark.parametrize("kw,msg", [
    ({"preset": "huge"}, "--preset 'huge': expected one of default, tiny"),
    ({"rl_baselines": ["gae"]}, r"--rl-baselines 'gae': expected rloo, grpo, reinforce\+\+ \(PPO itself is the ppo"),
    ({"rl_baselines": ["rloo"], "skip": ["ppo"]}, "--rl-baselines run beside the ppo stage: drop --skip ppo"),
    ({"skip": ["sft"]}, "--skip 'sft': only dpo, best_of_n and ppo can be skipped"),
    ({"rm_heldout": {"max_step": 3}}, r"pipeline\.rm_heldout: unknown config key 'max_step'; did you mean --max-steps"),
    ({"feedback": "db:labels.sqlite"}, r"--feedback db:labels\.sqlite: no such database; make it, and the labellers"),
    ({"feedback": "people"}, r"--feedback 'people': expected sim \(simulated labellers\) or db:FILE"),
    ({"use_thumbs": True}, r"--use-thumbs takes people's thumbs and A/B choices from the labelling app: it needs "
                           r"--feedback db:FILE"),
])
def test_config_errors(kw, msg):
    with pytest.raises(UsageError, match=msg):
        resolve(PipelineConfig(**kw))


def test_sqrt_kl_fits_and_their_verdicts():
    """Along PPO the proxy rises exactly as 2·√KL + 1 (R² 1, interval the point 2), the gold score falls, the held-out
    RM is noise; along best-of-n the proxy rises in √KL too. KL = √KL² is the contrast fit."""
    sqrt_kl = [0.0, 0.5, 1.0, 1.5, 2.0]
    rows = [{"ppo/sqrt_kl": x, "ppo/score": 2 * x + 1, "monitor/gold_reward": 1 - x,
             "monitor/rm_rm_heldout": [0.1, -0.1, 0.1, -0.1, 0.1][i]} for i, x in enumerate(sqrt_kl)]
    bon = {"n": [1, 2, 4], "sqrt_kl": [0.0, 0.55, 0.9], "proxy": [0.0, 0.55, 0.9], "gold": [0.0, 0.1, 0.0]}
    fits = {(along, name): (f, k) for along, name, f, k in report.sqrt_kl_fits(rows, bon)}
    assert list(fits) == [("PPO", "proxy RM (optimised)"), ("PPO", "gold score"), ("PPO", "held-out RM (rm_heldout)"),
                          ("best-of-n", "proxy RM (selects)"), ("best-of-n", "gold score")]
    proxy, against_kl = fits["PPO", "proxy RM (optimised)"]
    assert (proxy.slope, proxy.intercept, proxy.r2, proxy.slope_lo, proxy.slope_hi) == pytest.approx((2, 1, 1, 2, 2))
    assert against_kl.r2 < 1
    assert report.verdict(proxy, against_kl) == (f"rises linearly in √KL; a line in √KL fits better (R² 1.00 against "
                                                 f"{against_kl.r2:.2f})")
    assert report.verdict(*fits["PPO", "gold score"]).startswith("falls")
    assert report.verdict(*fits["PPO", "held-out RM (rm_heldout)"]).startswith("no trend")
    assert report.verdict(*fits["best-of-n", "proxy RM (selects)"]).startswith("rises linearly in √KL")
    assert report.sqrt_kl_fits(rows[:2], None) == []  # two iterations: nothing to fit
    # a run whose √KL never moved (its sampled KL at or below 0 in every iteration) gets no PPO line, and no error
    still = [dict(r, **{"ppo/sqrt_kl": 0.0}) for r in rows]
    assert [along for along, *_ in report.sqrt_kl_fits(still, bon)] == ["best-of-n", "best-of-n"]


def test_slots_give_each_model_its_share_of_a_prompts_responses():
    rng = random.Random(0)
    for k, m in ((4, 2), (3, 2), (5, 3), (4, 1)):
        seen = set()
        for _ in range(50):
            who = slots(k, m, rng)
            counts = sorted(who.count(w) for w in range(m))
            assert counts[0] == k // m and counts[-1] == -(-k // m) and sum(counts) == k
            seen.add(tuple(who))
        assert len(seen) > 1 or m == 1  # positions move between prompts


def test_prompt_limits_take_zero_for_the_whole_split_and_rivals_no_less():
    assert from_dict(PipelineConfig, {"rl_prompts": 0, "eval_prompts": 0, "rivals": 0}).rl_prompts == 0
    with pytest.raises(UsageError, match="--rivals -1: must be ≥ 0"):
        from_dict(PipelineConfig, {"rivals": -1})


def test_preset_values_sit_under_the_users(tmp_path):
    cfg = resolve(PipelineConfig(preset="tiny", k=5, sft={"lr": 0.5}))
    assert cfg.model == "tiny-llama" and cfg.k == 5
    assert cfg.sft["lr"] == 0.5 and cfg.sft["max_steps"] == 12  # merged, not replaced


def test_stage_override_typo_names_the_stage(tmp_path):
    proc = run_cli("pipeline", "--preset", "tiny", "--output", str(tmp_path / "p"), "--sft", "{lrr: 0.1}",
                   check=False)
    assert proc.returncode == 2 and "pipeline.sft: unknown config key 'lrr'; did you mean --lr?" in proc.stderr
