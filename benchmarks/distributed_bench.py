"""One process against two (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3) on the same model and global batch: throughput
and memory per process.

Each configuration is one real run of the CLI in its own launcher: `rlhfkit sft` (global batch 8 rows of up to 256
tokens: one process with --grad-accum 2, two processes with 1) and `rlhfkit ppo` (8 prompts × 2 samples, 32 new
tokens, GAE). Reported: SFT tokens/s (median of the logged steps after the first), PPO seconds per iteration
(median after the first) and its training tokens/s; the peak RSS of the largest process (the launcher's children,
`getrusage`), and what each process held of the trained weights and AdamW state (run.json's bytes_per_process).
PPO does not run with ZeRO-3 (refused), so that row has SFT only; --shard-frozen is PPO's alone.

    python benchmarks/distributed_bench.py --results-md benchmarks/RESULTS.md
    python benchmarks/distributed_bench.py --quick      # tiny-llama, two steps: checks the harness

With two processes on a 2-core machine each process gets one core (torchrun's OMP_NUM_THREADS=1), the single
process both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_section  # noqa: E402

# (row, processes, --sharding, runs SFT, PPO's extra options or None: no PPO run)
CONFIGS = [("1 process", 1, "ddp", True, []), ("2 processes, DDP", 2, "ddp", True, []),
           ("2 processes, FSDP2", 2, "fsdp2", True, []),
           ("2 processes, FSDP2, --shard-frozen", 2, "fsdp2", False, ["--shard-frozen"]),
           ("2 processes, ZeRO-2", 2, "zero2", True, []), ("2 processes, ZeRO-3", 2, "zero3", True, None)]

# run a command and print the peak RSS (KiB) of the largest process it started, its descendants included
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run(command: list[str], processes: int, out: Path) -> int:
    """Runs `rlhfkit COMMAND` on `processes` processes; returns the largest process's peak RSS in bytes."""
    launch = [sys.executable, "-m", "rlhfkit.cli"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m",
         "rlhfkit.cli"]
    proc = subprocess.run([sys.executable, "-c", MEASURE, *launch, *command, "--output", str(out), "--overwrite"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} on {processes} processes failed:\n{proc.stderr[-3000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) * 1024


def metrics(out: Path, key: str) -> list[float]:
    return [m[key] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="tiny-llama, two steps each (harness check)")
    p.add_argument("--steps", type=int, default=6, help="SFT steps and PPO iterations per configuration")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rlhfkit-distributed"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None)
    args = p.parse_args()
    model, steps = ("tiny-llama", 2) if args.quick else (args.model, args.steps)
    rows = []
    for i, (name, n, sharding, with_sft, ppo_extra) in enumerate(CONFIGS):
        sft_out, ppo_out = args.workdir / f"sft-{i}", args.workdir / f"ppo-{i}"
        row = {"config": name, "processes": n, "sharding": sharding}
        if with_sft:
            sft_rss = run(["sft", "--model", model, "--data", "sample:conversations", "--max-steps", str(steps),
                           "--batch-size", "4", "--grad-accum", str(2 // n), "--max-length", "256", "--val-fraction",
                           "0", "--sharding", sharding], n, sft_out)
            row |= {"sft_tokens_per_s": statistics.median(metrics(sft_out, "perf/tokens_per_s")[1:] or
                                                          metrics(sft_out, "perf/tokens_per_s")),
                    "sft_peak_rss": sft_rss,
                    "sft_held": json.loads((sft_out / "run.json").read_text())["bytes_per_process"]}
        if ppo_extra is not None:
            ppo_rss = run(["ppo", "--policy", model, "--reward-fn", f"{HERE / 'ppo_rewards.py'}:length_target",
                           "--iterations", str(steps), "--rollout-prompts", "8", "--n-samples", "2",
                           "--max-new-tokens", "32", "--minibatch-size", "16", "--batch-size", "8", "--sharding",
                           sharding, "--sample-every", "0", *ppo_extra], n, ppo_out)
            iteration_s = [sum(m[k] for k in m if k.startswith("time/") and k != "time/iteration")
                           for m in map(json.loads, (ppo_out / "metrics.jsonl").read_text().splitlines())
                           if "ppo/score" in m]
            run_json = json.loads((ppo_out / "run.json").read_text())
            row |= {"ppo_iteration_s": statistics.median(iteration_s[1:] or iteration_s),
                    "ppo_train_tokens_per_s": statistics.median(metrics(ppo_out, "perf/train_tokens_per_s")),
                    "ppo_peak_rss": ppo_rss, "ppo_held": run_json["bytes_per_process"],
                    "ppo_frozen": run_json["frozen_bytes_per_process"]}
        rows.append(row)
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    held = lambda h: gb(h["parameters"] + h["optimizer"])  # noqa: E731
    lines = ["| | SFT tokens/s | SFT peak RSS, largest process | SFT weights + AdamW per process | "
             "PPO s/iteration | PPO train tokens/s | PPO peak RSS, largest process | PPO weights + AdamW per process | "
             "PPO frozen weights per process |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | "
              + (f"{r['sft_tokens_per_s']:.0f} | {gb(r['sft_peak_rss'])} | {held(r['sft_held'])} | " if "sft_held" in r
                 else "— | — | — | ")
              + (f"{r['ppo_iteration_s']:.2f} | {r['ppo_train_tokens_per_s']:.0f} | {gb(r['ppo_peak_rss'])} | "
                 f"{held(r['ppo_held'])} | {gb(r['ppo_frozen'])} |" if "ppo_held" in r
                 else "— | — | — | — | — |")
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.results_md:
        command = (f"python benchmarks/distributed_bench.py --model {model} --steps {steps} "
                   "--results-md benchmarks/RESULTS.md")
        text = (f"CPU processes over gloo. {model}; SFT: {steps} steps of 8 rows (≤ 256 tokens); PPO: {steps} "
                f"iterations of 8 prompts × 2 samples, 32 new tokens, GAE. Medians after the first step/iteration. "
                f"Two processes share the machine's cores (one each), so the throughput shows the cost of the "
                f"collectives, not scaling; the bytes per process show what FSDP2 and ZeRO-3 shard (the trained "
                f"weights and AdamW state: halved) and ZeRO-2 (AdamW state only), not counting DeepSpeed's fp32 copy "
                f"of each process's part of the weights; --shard-frozen splits PPO's frozen reference over the "
                f"processes in fp32 (whole, its blocks' weights are kept in bf16 where the CPU computes in bf16, so on 2 "
                f"processes it saves little); the peak RSS "
                f"shows what the frozen models and, in PPO, each model gathered whole for its pass add. PPO does not "
                f"run with ZeRO-3.\n\n{table}")
        write_section(args.results_md, "distributed", "One process against two: DDP, FSDP2, DeepSpeed ZeRO", command,
                      machine_info(), text)


if __name__ == "__main__":
    main()
