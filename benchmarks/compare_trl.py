"""rlhfkit against TRL 1.16 on this machine, in one run: SFT, reward model, DPO and GRPO side by side.

    python benchmarks/compare_trl.py --quick      # tiny-llama, 128 tokens, batch 4, 2 steps: checks the harness
    python benchmarks/compare_trl.py              # smollm2-135m, ≤ 512 tokens, batch 8 (~50 min); writes RESULTS.md
    python benchmarks/compare_trl.py --only sft,dpo --steps dpo=4
    python benchmarks/compare_trl.py --dtype fp32  # both trainers in fp32, whatever this CPU does
    python benchmarks/compare_trl.py --only sft --variants nogc --max-length 256 --batch 4   # rlhfkit alone

Precision (`--dtype`): `auto` (the default) takes what rlhfkit's own `--dtype auto` picks on this machine
(rlhfkit.models.mixed_precision: bf16 autocast where the CPU does bf16 matmuls natively, AVX512-BF16 or AMX; fp32
without them, where a bf16 matmul runs at under 1 GFLOP/s against ~70 in fp32; `RLHFKIT_CPU_BF16=0|1` overrides the
detection for both). Both trainers then run in that precision: rlhfkit with `--dtype bf16|fp32`, TRL with
`bf16=True|False`; the matmul peak behind MFU is measured in it, and it names the output file and the section of
RESULTS.md, so bf16 and fp32 figures sit side by side.

For each algorithm the same model is trained on the same data with the same settings by TRL's trainer and by
rlhfkit's, one run after the other, each in a fresh subprocess (benchmarks/trl_side.py, benchmarks/rlhfkit_side.py)
so that its peak resident memory (the child's own ru_maxrss) is its alone, all with the same torch thread count.
Rows per algorithm (`--variants`): TRL with gradient checkpointing on (TRL 1.16's default in every config); rlhfkit
with it on (`gc`; skipped with a note while the CLI lacks the flag); rlhfkit with its default, off (`nogc`); rlhfkit
with it off and its transformer blocks compiled (`compile`: `--compile true`, torch.compile / Inductor; TRL's
`torch_compile` stays at its default, off); with both (`gc-compile`); and with it off and each batch run as
MICRO micro-batches whose gradients accumulate into the same optimizer step (`micro`: `--batch-size B/MICRO
--grad-accum MICRO`, GRPO `--batch-size n/MICRO`): the activation memory of a quarter batch without recomputation.
rlhfkit runs through its CLI (`rlhfkit sft|rm|dpo|ppo --advantage grpo`), data loading and logging included.

Made equal: the model (one local Hugging Face directory; for the reward model one initial directory whose score
head rlhfkit's seed drew once, so both start from the same weights), the data (benchmarks/compare_data.py: JSONL in
formats both read, rendered by the model's real chat template on both sides, every sequence filled with prose to
just under the length limit), the batch (SFT rows; RM and DPO pairs; GRPO completions), the precision (fp32
master weights, with bf16 autocast in a bf16 run; TRL: bf16=True or False, use_cpu=True), torch's fused AdamW (TRL's
default `adamw_torch_fused`, rlhfkit's training.adamw) with the same lr (rlhfkit's default per algorithm), betas,
eps 1e-8 and weight decay 0, a constant learning rate without warm-up, clipping at 1.0, the number of steps.
The SFT, RM and DPO data sets hold exactly one batch, so every step of both trainers sees the same examples in
whatever order each trainer's sampler draws them (GRPO: one generation batch of prompts). What could not be made
equal is listed in compare_report.DIFFERENCES, which goes into RESULTS.md with the figures.

Measured per run: the wall time of every step (rlhfkit: between its logged steps; TRL: between a callback's
step-end stamps), the first steps' losses (TRL's unrounded, from compute_loss), the tokens each side processed
(rlhfkit's metrics.jsonl `train/tokens`, TRL's `num_input_tokens_seen`; and the token ids and loss masks TRL built,
compared with rlhfkit's tokenisation of the same file), peak RSS, set-up time and, for rlhfkit's DPO, the one-off
reference pass. Throughput counts every token of every sequence of a step (no padding) over the steps after the
first `--warmup`; for GRPO, completions generated and trained per second, all phases included. MFU = throughput ×
model FLOPs per token (benchmarks/common.py; the same figure for both trainers: the policy's forward and backward
only, logits credited at trained positions) / the matmul peak in the run's dtype (bf16 or fp32) measured in this
run before and after the training runs (the higher of the two).

Output: benchmarks/results/compare_trl_MODE.json for bf16, compare_trl_MODE_fp32.json for fp32 (raw; `--results-json`
puts it elsewhere; with --only, the other algorithms keep their last figures of the same mode and dtype) and, in full
mode (or with --write-results), the dtype's section of benchmarks/RESULTS.md between its trl-compare markers
(compare_report.markers: bf16's are the original `trl-compare:start/end`, fp32's `trl-compare:fp32:start/end`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # run as a script from anywhere: find the helper modules beside this file
from common import machine_info, matmul_peak, model_flops_per_token  # noqa: E402
from compare_data import (check_tokens, prepare_models, prompt_tokens, rlhfkit_sequences,  # noqa: E402
                          training_chat_template, trained, write_data)
from compare_report import NAMES, Row, markdown, markers, report_dtype, rewrite_results  # noqa: E402

ALGOS = ("sft", "rm", "dpo", "grpo")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype bf16|fp32: rlhfkit's flag and the peak's dtype
# set in the environment, these change the dtype --dtype auto picks or the kernels (ISA) the runs and the peak use;
# the report records them (MKL, behind torch's fp32 matmul on x86, ignores the first two: MKL_ENABLE_INSTRUCTIONS)
ISA_ENV = ("RLHFKIT_CPU_BF16", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
VARIANTS = ("trl", "gc", "gc-compile", "nogc", "compile", "micro")
MICRO = 4  # micro-batches of the `micro` variant
REWARD_FN = "benchmarks/ppo_rewards.py:length_target"
GRPO_BETA = 0.04  # KL coefficient of both sides (TRL's default 0 would drop its reference model altogether)


@dataclass(frozen=True)
class Preset:
    model: str
    max_length: int  # every sequence is filled to just under this many tokens
    batch: int  # SFT rows; RM and DPO pairs (2× sequences)
    steps: dict[str, int]
    warmup: int  # first steps left out of throughput
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    peak_n: int
    peak_seconds: float


PRESETS = {
    "quick": Preset("tiny-llama", 128, 4, dict(sft=2, rm=2, dpo=2, grpo=2), 1, 2, 4, 16, 1024, 1.0),
    # ≈ 30 min here: TRL's SFT step ≈ 43 s, its DPO step ≈ 100 s (≈ 95 and ≈ 81 tokens/s)
    "full": Preset("smollm2-135m", 512, 8, dict(sft=5, rm=4, dpo=3, grpo=3), 1, 4, 4, 48, 2048, 3.0),
}


# --- runs -------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    preset: Preset
    root: Path
    threads: int
    causal: Path
    rm_dir: Path
    files: dict[str, Path]
    expected: dict[str, list[dict]]  # rlhfkit's tokenisation of the SFT, RM and DPO data
    template: str  # the chat template with generation markers, for TRL's SFT
    grpo_prompt_tokens: int  # all GRPO prompts, rendered with the generation prompt
    dtype: str = "bf16"  # "bf16" (autocast over fp32 weights) or "fp32", for both trainers


def config_class(algo: str):
    from rlhfkit.algos import dpo, ppo, reward, sft

    return {"sft": sft.SFTConfig, "rm": reward.RMConfig, "dpo": dpo.DPOConfig, "grpo": ppo.PPOConfig}[algo]


def optim(algo: str) -> dict:
    """rlhfkit's default optimisation for the algorithm; TRL gets the same numbers."""
    cfg = config_class(algo)()
    return {"lr": cfg.lr, "betas": list(cfg.adam_betas), "eps": 1e-8, "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm, "clip_eps": getattr(cfg, "clip_eps", None),
            "beta": getattr(cfg, "beta", None)}


def child_env(ctx: Context) -> dict[str, str]:
    n = str(ctx.threads)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
            "HF_DATASETS_CACHE": str(ctx.root / "hf-datasets"), "PYTHONPATH": str(REPO / "src")}


def rlhfkit_argv(algo: str, ctx: Context, gc: bool, out: Path, compiled: bool = False, micro: int = 1) -> list[str]:
    p, o, S = ctx.preset, optim(algo), str(ctx.preset.steps[algo])
    n = p.grpo_prompts * p.grpo_generations
    if p.batch % micro or n % micro:
        raise SystemExit(f"--variants micro: batch {p.batch} and GRPO's {n} completions must divide by {micro}")
    common = ["--output", str(out), "--dtype", ctx.dtype, "--seed", "0", "--log-steps", "1", "--lr", str(o["lr"]),
              "--schedule", "constant", "--warmup-ratio", "0", "--weight-decay", str(o["weight_decay"]),
              "--max-grad-norm", str(o["max_grad_norm"])] + (["--gradient-checkpointing", "true"] if gc else []) \
        + (["--compile", "true"] if compiled else [])
    fixed = ["--max-steps", S, "--batch-size", str(p.batch // micro), "--grad-accum", str(micro),
             "--max-length", str(p.max_length), "--val-fraction", "0"]
    return {
        "sft": ["sft", "--model", str(ctx.causal), "--data", str(ctx.files["sft"]), *fixed],
        "rm": ["rm", "--model", str(ctx.rm_dir), "--data", str(ctx.files["pairs"]), *fixed, "--normalize", "false"],
        "dpo": ["dpo", "--model", str(ctx.causal), "--data", str(ctx.files["pairs"]), *fixed,
                "--ref-mode", "precomputed", "--beta", str(o["beta"])],
        "grpo": ["ppo", "--policy", str(ctx.causal), "--reward-fn", REWARD_FN, "--prompts", str(ctx.files["prompts"]),
                 "--advantage", "grpo", "--iterations", S, "--rollout-prompts", str(p.grpo_prompts),
                 "--n-samples", str(p.grpo_generations), "--max-new-tokens", str(p.grpo_new_tokens),
                 "--temperature", "1", "--top-p", "1", "--kl-coef", str(GRPO_BETA), "--clip-eps", str(o["clip_eps"]),
                 "--whiten-advantages", "false", "--missing-eos", "none", "--minibatch-size", str(n),
                 "--batch-size", str(n // micro), "--sample-every", "0"],
    }[algo] + common


def trl_spec(algo: str, ctx: Context, out: Path, result: Path) -> dict:
    p, o = ctx.preset, optim(algo)
    n = p.grpo_prompts * p.grpo_generations
    data = {"sft": ctx.files["sft"], "grpo": ctx.files["prompts"]}.get(algo, ctx.files["pairs"])
    return {"algo": algo, "model": str(ctx.rm_dir if algo == "rm" else ctx.causal), "data": str(data),
            "output": str(out), "result": str(result), "threads": ctx.threads, "seed": 0, "dtype": ctx.dtype,
            "steps": p.steps[algo], "batch_size": n if algo == "grpo" else p.batch, "max_length": p.max_length,
            "optim": o, "beta": o["beta"], "training_chat_template": ctx.template,
            "reward_fn": str(REPO / REWARD_FN.split(":")[0]) + ":" + REWARD_FN.split(":")[1],
            "grpo": {"generations": p.grpo_generations, "new_tokens": p.grpo_new_tokens, "beta": GRPO_BETA,
                     "clip_eps": o["clip_eps"]}}


def run_child(cmd: list[str], ctx: Context, name: str) -> tuple[int, Path]:
    """Run one child with its output in logs/NAME.log; its result JSON goes to results/NAME.json."""
    log = ctx.root / "logs" / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, env=child_env(ctx), stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        print(f"  FAILED (exit {code}); last lines of {log}:\n    " + "\n    ".join(tail), file=sys.stderr)
    return code, log


def deltas(cumulative: list[float]) -> list[float]:
    return [b - a for a, b in zip([0] + cumulative, cumulative)]


def run_rlhfkit(algo: str, ctx: Context, gc: bool, compiled: bool = False, micro: int = 1) -> Row:
    name = (f"{algo}-rlhfkit-{'gc' if gc else 'nogc'}{'-compile' if compiled else ''}"
            f"{f'-micro{micro}' if micro > 1 else ''}")
    out, result = ctx.root / "runs" / name, ctx.root / "results" / f"{name}.json"
    shutil.rmtree(out, ignore_errors=True)  # no cached reference log-probs or checkpoints from an earlier run
    argv = rlhfkit_argv(algo, ctx, gc, out, compiled, micro)
    row = Row(algo, "rlhfkit", gc, "rlhfkit " + " ".join(argv), compiled=compiled, micro_batches=micro)
    code, log = run_child([sys.executable, str(HERE / "rlhfkit_side.py"), "--threads", str(ctx.threads),
                           "--result", str(result), "--", *argv], ctx, name)
    if code != 0:
        return replace(row, error=f"exit {code}, see {log}")
    timing = json.loads(result.read_text())
    if timing["threads"] != ctx.threads:
        return replace(row, error=f"ran with {timing['threads']} torch threads, not {ctx.threads}")
    shutil.copy(out / "metrics.jsonl", ctx.root / "results" / f"{name}.metrics.jsonl")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "ppo/score" if algo == "grpo" else "train/loss"
    by_step = {m["step"]: m for m in reversed(metrics) if key in m}  # reversed: the first record of a step wins
    steps = [by_step[s] for s in sorted(by_step)]
    times = [t for _, t, keys in timing["stamps"]["log"] if key in keys]
    start = timing["stamps"]["tracker_init"][0]  # each trainer makes its tracker right before its loop
    row.step_s = deltas([t - start for t in times])
    row.setup_s, row.wall_s, row.peak_rss_mb = start, timing["wall_s"], timing["peak_rss_mb"]
    row.reference_s = timing["precompute_s"]
    if algo == "grpo":
        n = ctx.preset.grpo_prompts * ctx.preset.grpo_generations
        row.losses = [m["ppo/policy_loss"] for m in steps]
        row.completions = [n] * len(steps)
        prompts = ctx.grpo_prompt_tokens * ctx.preset.grpo_generations
        row.tokens = [round(prompts + m["rollout/length"] * n) for m in steps]
    else:
        row.losses = [m["train/loss"] for m in steps]
        row.tokens = deltas([m["train/tokens"] for m in steps])
    shutil.rmtree(out, ignore_errors=True)  # the saved model (hundreds of MB for smollm2) is not needed
    return row


def run_trl(algo: str, ctx: Context) -> Row:
    import trl

    name = f"{algo}-trl"
    out, result = ctx.root / "runs" / name, ctx.root / "results" / f"{name}.json"
    spec_path = ctx.root / "results" / f"{name}.spec.json"
    spec = trl_spec(algo, ctx, out, result)
    spec_path.write_text(json.dumps(spec, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    row = Row(algo, f"TRL {trl.__version__}", True, f"python benchmarks/trl_side.py {spec_path}")
    code, log = run_child([sys.executable, str(HERE / "trl_side.py"), str(spec_path)], ctx, name)
    if code != 0:
        return replace(row, error=f"exit {code}, see {log}")
    r = json.loads(result.read_text())
    if r["threads"] != ctx.threads:
        return replace(row, error=f"ran with {r['threads']} torch threads, not {ctx.threads}")
    row.gradient_checkpointing = r["gradient_checkpointing"]
    settings = ", ".join(f"{k}={v!r}" for k, v in r["config_kwargs"].items())
    row.command = (f"# benchmarks/trl_side.py: trl.{r['trainer']}(model={spec['model']!r}, "
                   f"train_dataset=load_dataset('json', data_files={spec['data']!r}), processing_class=rlhfkit "
                   f"load_tokenizer(model){' with generation markers' if algo == 'sft' else ''}"
                   f"{', reward_funcs=length_target' if algo == 'grpo' else ''}, args=trl.{r['config']}({settings})) "
                   f"with gradient_checkpointing at TRL's default ({r['gradient_checkpointing']})")
    # step 1 from its own begin (after the first batch is fetched); later steps from the previous step's end
    row.step_s = [r["step_end"][0] - r["step_begin"][0]] + deltas(r["step_end"])[1:]
    row.losses, row.peak_rss_mb, row.wall_s = r["losses"], r["peak_rss_mb"], r["wall_s"]
    row.setup_s = r["setup_s"] + r["step_begin"][0]
    row.tokens = deltas(r["tokens_seen"])
    if algo == "grpo":
        row.completions = [ctx.preset.grpo_prompts * ctx.preset.grpo_generations] * len(row.step_s)
    row.token_check = check_tokens(ctx.expected.get(algo, []), r["sequences"])
    shutil.rmtree(out, ignore_errors=True)
    return row


def has_gc_flag(algo: str) -> bool:
    """Whether rlhfkit's command has --gradient-checkpointing (added to rlhfkit while this harness was written):
    the CLI's flags are the fields of the command's config dataclass."""
    return "gradient_checkpointing" in {f.name for f in fields(config_class(algo))}


# --- figures ----------------------------------------------------------------------------------------------------


def finish(row: Row, ctx: Context, peak_gflops: float, config) -> Row:
    """Throughput over the steps after the warm-up, and MFU against this run's matmul peak in its dtype."""
    if row.error or len(row.step_s) <= ctx.preset.warmup:
        return row
    w = ctx.preset.warmup
    seconds = sum(row.step_s[w:])
    tokens = sum(row.tokens[w:])
    row.throughput = (sum(row.completions[w:]) if row.algo == "grpo" else tokens) / seconds
    if row.algo == "grpo":  # the policy's training forward + backward over prompt and completion
        n = ctx.preset.grpo_prompts * ctx.preset.grpo_generations
        completion = tokens - ctx.grpo_prompt_tokens * ctx.preset.grpo_generations * len(row.tokens[w:])
        seq, fraction = tokens / len(row.tokens[w:]) / n, completion / tokens
    else:
        seqs = ctx.expected[row.algo]
        seq = sum(len(s["ids"]) for s in seqs) / len(seqs)
        fraction = 0.0 if row.algo == "rm" else trained(seqs) / sum(len(s["ids"]) for s in seqs)
    row.flops_per_token = model_flops_per_token(config, round(seq), lm_head_fraction=fraction)
    row.mfu = tokens / seconds * row.flops_per_token / (peak_gflops * 1e9)
    return row


# --- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama, short sequences, a few steps (harness check)")
    p.add_argument("--only", default=",".join(ALGOS), help="comma-separated subset of sft,rm,dpo,grpo")
    p.add_argument("--steps", default=None, help="steps for all algorithms (N) or some (sft=5,dpo=3)")
    p.add_argument("--model", default=None, help="the preset's model instead (an rlhfkit model name)")
    p.add_argument("--max-length", type=int, default=None, help="the preset's sequence length instead")
    p.add_argument("--batch", type=int, default=None, help="the preset's batch instead (SFT rows; RM and DPO pairs)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of throughput")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="precision of both trainers and of the matmul peak: bf16 (autocast over fp32 weights) or "
                        "fp32; auto (default): what rlhfkit's --dtype auto picks here (RLHFKIT_CPU_BF16=0|1 "
                        "overrides its CPU detection)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of every run")
    p.add_argument("--workdir", type=Path, default=None,
                   help="data, models, logs and per-run JSON (default /tmp/rlhfkit-compare-trl-MODE)")
    p.add_argument("--results-json", type=Path, default=None,
                   help="the raw figures (default benchmarks/results/compare_trl_MODE.json, MODE_fp32 for fp32)")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--write-results", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite the dtype's marked section of RESULTS.md (default: in full mode only)")
    return p.parse_args(argv)


def preset_from(args: argparse.Namespace) -> Preset:
    preset = PRESETS["quick" if args.quick else "full"]
    steps = dict(preset.steps)
    for part in (args.steps or "").split(","):
        if part.strip():
            algo, _, n = part.rpartition("=")
            if algo and algo not in ALGOS:
                raise SystemExit(f"--steps {args.steps}: unknown algorithm {algo!r}; choose from {','.join(ALGOS)}")
            steps.update({algo: int(n)} if algo else dict.fromkeys(ALGOS, int(n)))
    overrides = {k: v for k, v in (("model", args.model), ("max_length", args.max_length), ("batch", args.batch),
                                   ("warmup", args.warmup)) if v is not None}
    return replace(preset, steps=steps, **overrides)


def resolve_dtype(choice: str) -> str:
    """--dtype to "bf16" or "fp32"; auto: rlhfkit's own choice on this machine (models.mixed_precision("auto"),
    which follows RLHFKIT_CPU_BF16)."""
    if choice != "auto":
        return choice
    from rlhfkit import models

    picked = models.mixed_precision("auto")
    if picked not in ("bf16", "no"):  # fp16: a CUDA device without bf16; the harness trains on the CPU
        raise SystemExit(f"--dtype auto: rlhfkit picks {picked!r} here; pass --dtype bf16 or fp32")
    return "bf16" if picked == "bf16" else "fp32"


def results_json(mode: str, dtype: str) -> Path:
    """The raw figures of a mode and dtype; bf16 keeps the name it had before --dtype existed."""
    return HERE / "results" / f"compare_trl_{mode}{'' if dtype == 'bf16' else '_' + dtype}.json"


def setup(preset: Preset, root: Path, threads: int, dtype: str = "bf16") -> Context:
    """Models, data and rlhfkit's tokenisation of the data, in the work directory."""
    from rlhfkit import models

    for d in ("runs", "results", "logs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    causal, rm_dir = prepare_models(preset.model, root)
    tok, rm_tok = models.load_tokenizer(str(causal)), models.load_tokenizer(str(rm_dir))
    files = write_data(tok, preset.max_length, preset.batch, preset.grpo_prompts, root / "data")
    expected = {a: rlhfkit_sequences(a, files, tok, rm_tok, preset.max_length) for a in ("sft", "rm", "dpo")}
    return Context(preset, root, threads, causal, rm_dir, files, expected, training_chat_template(tok),
                   prompt_tokens(tok, files["prompts"]), dtype)


def run_algorithm(algo: str, ctx: Context, variants: list[str]) -> tuple[list[Row], str | None]:
    """The `variants` of VARIANTS, in that order (rlhfkit with gradient checkpointing only when the CLI has the
    flag); and a note."""
    gc = has_gc_flag(algo)
    runs = {"trl": ("TRL (its defaults: checkpointing on)", lambda: run_trl(algo, ctx)),
            "gc": ("rlhfkit, checkpointing on", lambda: run_rlhfkit(algo, ctx, True)),
            "gc-compile": ("rlhfkit, checkpointing on, blocks compiled", lambda: run_rlhfkit(algo, ctx, True, True)),
            "nogc": ("rlhfkit, its default: checkpointing off", lambda: run_rlhfkit(algo, ctx, False)),
            "compile": ("rlhfkit, checkpointing off, blocks compiled", lambda: run_rlhfkit(algo, ctx, False, True)),
            "micro": (f"rlhfkit, checkpointing off, {MICRO} micro-batches",
                      lambda: run_rlhfkit(algo, ctx, False, micro=MICRO))}
    rows = []
    for label, run in [runs[v] for v in VARIANTS if v in variants and (gc or not v.startswith("gc"))]:
        print(f"{NAMES[algo]}: {label} ...", flush=True)
        rows.append(row := run())
        if not row.error:
            print(f"  step s {' '.join(f'{s:.2f}' for s in row.step_s)}; tokens/step {row.tokens}; losses "
                  f"{' '.join(f'{x:.4f}' for x in row.losses)}; peak RSS {row.peak_rss_mb:,.0f} MB; "
                  f"wall {row.wall_s:.0f} s", flush=True)
    note = None if gc else ("rlhfkit with gradient checkpointing not run: this checkout's CLI has no "
                            "--gradient-checkpointing.")
    return rows, note


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=REPO).stdout
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__, "datasets": datasets.__version__,
            "rlhfkit": git.strip() + (" with uncommitted changes in src/" if dirty.strip() else "")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    only = [a.strip() for a in args.only.split(",") if a.strip()]
    if unknown := set(only) - set(ALGOS):
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {','.join(ALGOS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    preset = preset_from(args)
    dtype = resolve_dtype(args.dtype)
    root = args.workdir or Path(f"/tmp/rlhfkit-compare-trl-{mode}")
    torch.set_num_threads(args.threads)  # the matmul peak with the threads every run gets
    print(f"compare_trl ({mode}, {dtype}{' from --dtype auto' if args.dtype == 'auto' else ''}): {preset.model}, "
          f"≤ {preset.max_length} tokens, batch {preset.batch}, steps {preset.steps}, {args.threads} threads; "
          f"work in {root}", flush=True)

    # 1. the peak before, models and data, the runs, the peak after (in the runs' dtype)
    peak = {"dtype": dtype, "before": matmul_peak(DTYPES[dtype], preset.peak_n, preset.peak_seconds)}
    ctx = setup(preset, root, args.threads, dtype)
    results = {algo: run_algorithm(algo, ctx, variants) for algo in ALGOS if algo in only}
    peak["after"] = matmul_peak(DTYPES[dtype], preset.peak_n, preset.peak_seconds)

    # 2. figures; algorithms left out by --only keep their figures from the last run of this mode and dtype
    from transformers import AutoConfig

    config, best = AutoConfig.from_pretrained(ctx.causal), max(peak["before"], peak["after"])
    date = datetime.date.today().isoformat()
    current = {a: {"date": date, "note": note, "rows": [asdict(finish(r, ctx, best, config)) for r in rows]}
               for a, (rows, note) in results.items()}
    out_json = args.results_json or results_json(mode, dtype)
    previous = {}
    if out_json.is_file():
        old = json.loads(out_json.read_text())
        if report_dtype(old) == dtype:  # files from before --dtype hold bf16 figures
            previous = old["algorithms"]
        else:
            print(f"{out_json} holds {report_dtype(old)} figures: only this run's algorithms go into it", flush=True)
    command = " ".join(["python benchmarks/compare_trl.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"mode": mode, "dtype": dtype, "date": date, "command": command,
              "preset": asdict(preset), "threads": args.threads, "machine": machine_info(), "versions": versions(),
              "env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
              "peak_gflops": peak, "optim": {a: optim(a) for a in ALGOS},
              "algorithms": {a: current.get(a) or previous[a] for a in ALGOS if a in current or a in previous}}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")

    # 3. the markdown section
    section = markdown(report)
    print("\n" + section)
    if args.write_results if args.write_results is not None else mode == "full":
        rewrite_results(args.results_md, section, dtype)
        print(f"\nrewrote the {dtype} section of {args.results_md} (between {' and '.join(markers(dtype))}); "
              f"raw figures in {out_json}")
    else:
        print(f"\nraw figures in {out_json} (RESULTS.md untouched: --write-results rewrites it)")


if __name__ == "__main__":
    main()
