"""SFT training throughput and MFU of rlhfkit's own training step, on synthetic fixed-length rows.

What runs: the code path of `rlhfkit.algos.sft.train`, one micro-batch per optimizer step on one process:
`forward.rows` -> `batch_nll` through `forward.SelectedLogits` (logits only at trained positions) -> backward of the
token-mean loss -> gradient clipping -> AdamW step -> LR schedule step, with the model in fp32 master weights
and accelerate's autocast in the chosen precision. Data loading, logging, evaluation and checkpointing are not
part of it.

Data: `batch_size` rows of exactly `seq_len` random token ids from the model's real tokenizer (special and
added tokens excluded), loss mask 1 on the second half of each row, as if the first half were the prompt and
the second the response. Every step gets fresh rows; all rows are built before anything is timed.

Measured, in one process:
  1. the matmul peak: sustained GFLOP/s of a 2048² torch.matmul in bf16 and fp32 (benchmarks/common.py);
  2. `warmup` untimed steps (kernel selection, allocator growth, lazy initialisation), then `steps` timed steps.
Reported: tokens/s = batch·seq_len·steps / timed seconds (all tokens, prompt half included, since the forward
and backward run over all of them); mean step time; achieved model TFLOP/s = tokens/s × model FLOPs per token
(PaLM formula in `common.model_flops_per_token`, lm_head counted only at trained positions); MFU = achieved
model FLOP/s / measured matmul peak of the compute dtype (bf16 peak under bf16 autocast, fp32 peak without);
peak RSS of the process; the loss of every step (random tokens: ~ln(vocab) or above for any model).

    python benchmarks/sft_bench.py --model smollm2-135m --seq-len 512 --batch-size 8 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere: find common.py
from common import machine_info, matmul_peak, model_flops_per_token, non_embedding_params, peak_rss_mb  # noqa: E402

from rlhfkit import forward, models  # noqa: E402
from rlhfkit.algos import sft  # noqa: E402
from rlhfkit.data.chat import TokenizedExample  # noqa: E402
from rlhfkit.training import adamw  # noqa: E402


@dataclass
class Result:
    model: str
    dtype: str  # accelerate mixed_precision actually used: bf16, fp16 or no (fp32)
    device: str
    seq_len: int
    batch_size: int
    warmup: int
    steps: int
    params_total: int
    params_non_embedding: int
    tokens_per_s: float
    step_s_mean: float
    step_s_min: float
    step_s_max: float
    flops_per_token: float
    achieved_tflops: float
    peak_gflops_bf16: float
    peak_gflops_fp32: float
    mfu: float  # against the peak of the compute dtype (see module docstring)
    peak_rss_mb: float
    losses: list[float]  # every step, warm-up first
    machine: dict[str, Any] = field(default_factory=dict)


def synthetic_rows(tok, n_rows: int, seq_len: int, vocab_limit: int, seed: int) -> list[TokenizedExample]:
    """`n_rows` rows of `seq_len` random ordinary token ids; the second half carries the loss."""
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    ordinary = torch.tensor([i for i in range(min(len(tok), vocab_limit)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    ids = ordinary[torch.randint(len(ordinary), (n_rows, seq_len), generator=gen)]
    mask = [0] * (seq_len // 2) + [1] * (seq_len - seq_len // 2)
    return [TokenizedExample(row.tolist(), mask, f"synthetic:{i}") for i, row in enumerate(ids)]


def ensure_cached(model: str) -> None:
    # The first use of a GGUF model converts it (~1 GB of transient memory for SmolLM2). Do that in a child
    # process: ru_maxrss of this process then reflects training only (RUSAGE_SELF excludes children).
    code = "import sys; from rlhfkit import models; models.resolve(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, model], check=True)


def count_non_embedding(lm) -> tuple[int, int]:
    """(all parameters, parameters minus input embedding and an untied lm_head); tied weights count once."""
    total = sum(p.numel() for p in lm.parameters())  # parameters() yields a tied weight once
    embed = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    return total, total - embed.numel() - (0 if tied else head.numel())


def run(args: argparse.Namespace) -> Result:
    from accelerate import Accelerator

    # same setup as sft.train: accelerate owns device and autocast, the model keeps fp32 master weights
    precision = models.mixed_precision(args.dtype)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    torch.manual_seed(args.seed)

    # 1. the peak, before any model memory or threads are busy
    peak_bf16 = matmul_peak(torch.bfloat16, n=args.peak_n, seconds=args.peak_seconds, device=device)
    peak_fp32 = matmul_peak(torch.float32, n=args.peak_n, seconds=args.peak_seconds, device=device)
    peak = {"bf16": peak_bf16, "no": peak_fp32}.get(precision, peak_bf16)  # fp16: no fp16 peak measured

    # 2. model, optimizer, schedule and data, exactly as sft.train builds them
    ensure_cached(args.model)
    cfg = sft.SFTConfig(model=args.model, max_length=args.seq_len, batch_size=args.batch_size,
                        max_steps=args.warmup + args.steps, dtype=args.dtype, seed=args.seed)
    tok = models.load_tokenizer(cfg.model)
    lm = sft.build_model(cfg, tok)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = sft.make_schedule(optimizer, cfg, cfg.max_steps)
    net, optimizer = accelerator.prepare(forward.SelectedLogits(lm), optimizer)

    vocab_rows = lm.get_input_embeddings().weight.shape[0]
    rows = synthetic_rows(tok, cfg.max_steps * cfg.batch_size, cfg.max_length, vocab_rows, cfg.seed)
    batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]

    # 3. the loop: sft.train step 5.2-5.4 with one process and one micro-batch per step
    losses: list[float] = []
    times: list[float] = []
    for step, mb in enumerate(batches):
        t0 = time.perf_counter()
        n_loss_tokens = sum(sum(r.loss_mask[1:]) for r in mb)
        batch = forward.rows(mb, tok.pad_token_id)
        nll = sft.batch_nll(net, batch, device)
        accelerator.backward(nll / max(n_loss_tokens, 1))
        # .item() waits for the step's compute, as sft.train's loss logging does, so the timer is honest
        loss = accelerator.reduce(nll.detach(), "sum").item() / max(n_loss_tokens, 1)
        grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the optimizer step is asynchronous on GPU
        elapsed = time.perf_counter() - t0
        losses.append(loss)
        if step >= args.warmup:
            times.append(elapsed)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            print(f"warning: step {step + 1}: non-finite loss {loss} or grad norm {grad_norm}", file=sys.stderr)

    # 4. numbers
    total_params, non_emb = count_non_embedding(lm)
    if non_emb != non_embedding_params(lm.config):  # the FLOPs formula counts parameters from the config
        print(f"warning: non-embedding parameters: model has {non_emb:,}, the config formula gives "
              f"{non_embedding_params(lm.config):,}; MFU uses the formula", file=sys.stderr)
    selected = cfg.max_length - cfg.max_length // 2  # = positions t whose token t+1 carries loss, per row
    flops_per_token = model_flops_per_token(lm.config, cfg.max_length, lm_head_fraction=selected / cfg.max_length)
    measured_s = sum(times)
    tokens_per_s = len(times) * cfg.batch_size * cfg.max_length / measured_s
    achieved = tokens_per_s * flops_per_token
    return Result(
        model=args.model, dtype=precision, device=str(device), seq_len=cfg.max_length, batch_size=cfg.batch_size,
        warmup=args.warmup, steps=args.steps, params_total=total_params, params_non_embedding=non_emb,
        tokens_per_s=tokens_per_s, step_s_mean=measured_s / len(times), step_s_min=min(times),
        step_s_max=max(times), flops_per_token=flops_per_token, achieved_tflops=achieved / 1e12,
        peak_gflops_bf16=peak_bf16, peak_gflops_fp32=peak_fp32, mfu=achieved / (peak * 1e9),
        peak_rss_mb=peak_rss_mb(), losses=losses, machine=machine_info(),
    )


HEADER = ("| model | dtype | seq | batch | threads | tokens/s | step s | model TFLOP/s | matmul peak GFLOP/s "
          "| MFU | peak RSS MB | loss (first steps) |")


def table_row(r: Result) -> str:
    peak = r.peak_gflops_fp32 if r.dtype == "no" else r.peak_gflops_bf16
    dtype = "fp32" if r.dtype == "no" else r.dtype
    first = ", ".join(f"{x:.3f}" for x in r.losses[:3])
    return (f"| {r.model} | {dtype} | {r.seq_len} | {r.batch_size} | {r.machine.get('torch_threads')} "
            f"| {r.tokens_per_s:,.0f} | {r.step_s_mean:.3f} | {r.achieved_tflops:.3f} | {peak:,.0f} "
            f"| {r.mfu:.1%} | {r.peak_rss_mb:,.0f} | {first} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="rlhfkit model name (alias, HF dir, .gguf, hub id)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (every row exactly this long)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute precision, as rlhfkit sft --dtype (auto: bf16 where the CPU has it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul peak measurement")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="seconds per dtype for the matmul peak")
    p.add_argument("--json", type=Path, default=None, help="also write the full result as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 2 or args.batch_size < 1:
        p.error("need --steps >= 1, --warmup >= 0, --seq-len >= 2, --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    print(table_row(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
