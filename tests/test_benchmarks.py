"""Every benchmark script's --quick run: the harnesses behind RESULTS.md's figures still run against the code they
time (they drive rlhfkit's own commands and engine, so a change there that breaks them fails here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow


def run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_compare_trl_quick_runs_both_trainers(tmp_path):
    out = tmp_path / "r.json"
    run(str(BENCH / "compare_trl.py"), "--quick", "--only", "sft,dpo", "--variants", "trl,nogc", "--workdir",
        str(tmp_path / "w"), "--results-json", str(out), "--no-write-results")
    report = json.loads(out.read_text())
    for algo in ("sft", "dpo"):
        rows = report["algorithms"][algo]["rows"]
        assert [r["trainer"].split()[0] for r in rows] == ["TRL", "rlhfkit"]
        assert all(not r["error"] and r["throughput"] > 0 for r in rows), rows


def test_scaling_quick_times_rlhfkit_sft(tmp_path):
    out = tmp_path / "s.json"
    run(str(BENCH / "scaling_bench.py"), "--quick", "--workdir", str(tmp_path / "w"), "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["seq"], r["batch"]) for r in rows] == [(128, 2), (128, 4)]
    assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)


def test_generate_quick_times_every_backend():
    result = json.loads(run(str(BENCH / "generate_bench.py"), "--quick"))
    assert {"generate", "hfengine-llama", "hfengine-hf"} <= set(result)
    assert all(result[k]["tokens"] > 0 for k in ("generate", "hfengine-llama", "hfengine-hf"))


def test_ppo_test_margins_quick_prints_every_estimator():
    out = run(str(BENCH / "ppo_test_margins.py"), "--quick")
    assert all(f"| {name} |" in out for name in ("gae", "grpo", "rloo", "reinforce++"))


def test_distributed_quick_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "d.json"
    run(str(BENCH / "distributed_bench.py"), "--quick", "--workdir", str(tmp_path / "w"), "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["processes"], r["sharding"]) for r in rows] == [(1, "ddp"), (2, "ddp"), (2, "fsdp2"), (2, "fsdp2"),
                                                                (2, "zero2"), (2, "zero3")]
    assert rows[2]["sft_held"]["parameters"] < rows[1]["sft_held"]["parameters"]
    assert rows[3]["ppo_frozen"] < rows[2]["ppo_frozen"]  # --shard-frozen
    assert rows[5]["sft_held"]["parameters"] < rows[4]["sft_held"]["parameters"]  # zero3 splits the weights


def test_ray_quick_runs_each_placement_with_the_in_process_scores(tmp_path):
    out = tmp_path / "r.json"
    run(str(BENCH / "ray_bench.py"), "--quick", "--workdir", str(tmp_path / "w"), "--json", str(out))
    rows = json.loads(out.read_text())
    # in-process; Ray colocated, apart, apart with two engines, and with actor and critic ddp and fsdp2 groups
    assert [r["config"].split(",")[0] for r in rows] == ["in-process (--backend local)"] + ["Ray"] * 5
    assert all(r["iteration_s"] > 0 for r in rows)
    # one engine samples as the in-process run does, in any placement (two batch otherwise: bf16 rounds otherwise)
    assert [r["differs_at"] for r in rows[:3]] == [None, None, None]


def test_distill_gold_quick_scores_the_three_arms(tmp_path):
    out = run(str(BENCH / "distill_gold.py"), "--quick", "--workdir", str(tmp_path))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert sorted(scores) == ["distilled", "prompted", "unprompted"] and all(len(s) == 8 for s in scores.values())
    assert "| distilled − prompted |" in out
