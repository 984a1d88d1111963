"""Context distillation judged by the built-in task's gold score: does the distilled model, asked without the HHH
context, answer as well as the starting model asked with it (Askell et al. 2021, §3.4)?

Three arms on the same held-out prompts (the first N of the task's evaluation split, seed 0), one sample each at
the same sampling seed: the starting model without the context, the starting model with it (the context as the
system message, as `rlhfkit distill-context` shows it to its teacher), and the distilled model without it. Printed:
each arm's mean gold score, and per prompt the differences distilled − prompted, prompted − unprompted and
distilled − unprompted with 95% intervals (normal, paired) and the win rate with its Wilson interval.

    rlhfkit distill-context --model smollm2-135m --prompts sim:sft ... --output runs/distill
    .venv/bin/python benchmarks/distill_gold.py --model smollm2-135m --distilled runs/distill

`--quick` distils tiny-llama for a few steps first and checks the harness.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhfkit.algos.distill import CONTEXTS
from rlhfkit.evaluate.winrates import wilson_interval
from rlhfkit.sim import tasks


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], check=True, stdout=subprocess.DEVNULL)


def prompt_files(work: Path, n: int, context: str) -> tuple[Path, Path]:
    """The evaluation split's first n prompts with their gold tasks, without and with the context."""
    split = [t for t in tasks.build_suite(2000, 0) if tasks.split_of(t) == "eval"][:n]
    plain, prompted = work / "plain.jsonl", work / "prompted.jsonl"
    with plain.open("w") as a, prompted.open("w") as b:
        for t in split:
            user = [{"role": "user", "content": t.prompt}]
            a.write(json.dumps({**tasks.to_row(t), "prompt": user}) + "\n")
            b.write(json.dumps({**tasks.to_row(t), "prompt": [{"role": "system", "content": context}, *user]}) + "\n")
    return plain, prompted


def paired(x: list[float], y: list[float]) -> str:
    d = [a - b for a, b in zip(x, y)]
    mean, half = statistics.mean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(x, y))
    lo, hi = wilson_interval(wins, len(d))
    return f"{mean:+.3f} ({mean - half:+.3f} to {mean + half:+.3f}) | {wins / len(d):.3f} ({lo:.3f}–{hi:.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the starting model (teacher)")
    p.add_argument("--distilled", help="the distilled model's directory (from `rlhfkit distill-context`)")
    p.add_argument("--context", default="hhh", help="the distilled context: a shipped name or a text file")
    p.add_argument("--prompts", type=int, default=200, help="held-out evaluation prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--workdir", help="where the prompts and eval outputs go (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny-llama, distilled for 2 steps here: checks the harness")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distill-gold-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model, args.prompts, args.max_new_tokens, args.distilled = "tiny-llama", 8, 8, str(work / "distilled")
        sft = [t for t in tasks.build_suite(300, 0) if tasks.split_of(t) == "sft"][:16]
        (work / "sft.jsonl").write_text("".join(json.dumps({"prompt": t.prompt}) + "\n" for t in sft))
        cli("distill-context", "--model", args.model, "--prompts", str(work / "sft.jsonl"), "--max-steps", "2",
            "--max-new-tokens", "8", "--dtype", "fp32", "--output", args.distilled)
    if not args.distilled:
        p.error("--distilled DIR is needed (or --quick)")
    named = CONTEXTS / f"{args.context}.txt"
    context = (named if named.is_file() else Path(args.context)).read_text().strip()
    plain, prompted = prompt_files(work, args.prompts, context)
    common = ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature), "--seed", "0",
              "--bootstrap", "100"] + (["--dtype", "fp32"] if args.quick else [])
    cli("eval", "--models", args.model, args.distilled, "--labels", "unprompted", "distilled", "--prompts", str(plain),
        "--output", str(work / "eval_plain"), *common)
    cli("eval", "--models", args.model, "--labels", "prompted", "--prompts", str(prompted),
        "--output", str(work / "eval_prompted"), *common)
    scores: dict[str, list[float]] = {}
    for d in ("eval_plain", "eval_prompted"):
        for line in (work / d / "responses.jsonl").read_text().splitlines():
            for name, s in json.loads(line)["scores"].items():
                scores.setdefault(name, []).append(s)
    print(f"{args.prompts} held-out prompts, {args.max_new_tokens} new tokens, temperature {args.temperature}\n")
    print("| arm | mean gold score (95% CI) |\n|---|---|")
    for name, s in scores.items():
        mean, half = statistics.mean(s), 1.96 * statistics.stdev(s) / math.sqrt(len(s))
        print(f"| {name} | {mean:.3f} ({mean - half:.3f} to {mean + half:.3f}) |")
    print("\n| paired, per prompt | mean difference (95% CI) | win rate (95% Wilson) |\n|---|---|---|")
    for a, b in (("distilled", "prompted"), ("prompted", "unprompted"), ("distilled", "unprompted")):
        print(f"| {a} − {b} | {paired(scores[a], scores[b])} |")
    json.dump(scores, (work / "scores.json").open("w"))


if __name__ == "__main__":
    main()
