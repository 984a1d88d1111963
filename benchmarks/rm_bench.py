"""Reward-model training throughput and MFU of rlhfkit's own RM step, on synthetic fixed-length pairs.

What runs: the code path of `rlhfkit.algos.reward.train` on one process, one micro-batch per optimizer step:
`collate_preferences` -> `forward.scores` (AutoModelForSequenceClassification, num_labels=1, pooled at the last
real token) -> `preference_loss_sum` (InstructGPT's per-prompt mean over pairs) -> backward -> clipping ->
AdamW -> schedule, fp32 master weights under accelerate's autocast. Data loading, evaluation, normalisation
and checkpointing are not part of it.

Data: `batch_size` prompts per step, each with a chosen and a rejected response, every sequence exactly
`seq_len` random ordinary token ids, so a step processes 2 · batch_size · seq_len tokens.

Reported as in sft_bench.py: tokens/s over the timed steps, step time, model FLOP/s (PaLM formula; no LM head:
the score head is one row), MFU against the matmul peak of the compute dtype measured in the same run, peak
RSS, and every step's loss (random pairs: ≈ ln 2 at the start).

    python benchmarks/rm_bench.py --model smollm2-135m --seq-len 512 --batch-size 4 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
from common import machine_info, matmul_peak, model_flops_per_token, peak_rss_mb  # noqa: E402
from sft_bench import HEADER, Result, ensure_cached, synthetic_rows, table_row  # noqa: E402

from rlhfkit import forward, models, reward_model  # noqa: E402
from rlhfkit.algos import reward  # noqa: E402
from rlhfkit.training import adamw, make_schedule  # noqa: E402


def run(args: argparse.Namespace) -> Result:
    from accelerate import Accelerator

    precision = models.mixed_precision(args.dtype)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)

    # 1. the peak, before any model memory is allocated
    peak_bf16 = matmul_peak(torch.bfloat16, seconds=args.peak_seconds, device=accelerator.device)
    peak_fp32 = matmul_peak(torch.float32, seconds=args.peak_seconds, device=accelerator.device)
    peak = {"bf16": peak_bf16, "no": peak_fp32}.get(precision, peak_bf16)

    # 2. tokenizer with the RM pad token, model, optimizer and schedule, as reward.train builds them
    ensure_cached(args.model)
    steps = args.warmup + args.steps
    cfg = reward.RMConfig(model=args.model, max_length=args.seq_len, batch_size=args.batch_size,
                          max_steps=steps, dtype=args.dtype, seed=args.seed)
    tok = models.load_tokenizer(cfg.model)
    reward_model.set_reward_pad_token(tok)
    model = reward.build_model(cfg, tok)
    model.train()
    net = accelerator.prepare(model)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = make_schedule(optimizer, cfg, steps)
    optimizer = accelerator.prepare_optimizer(optimizer)

    seqs = synthetic_rows(tok, 2 * steps * cfg.batch_size, cfg.max_length, len(tok), cfg.seed)
    prefs = [reward.EncodedPreference([a.input_ids, b.input_ids], [(0, 1)], None, [0, 0], a.where)
             for a, b in zip(seqs[0::2], seqs[1::2])]
    batches = [prefs[i:i + cfg.batch_size] for i in range(0, len(prefs), cfg.batch_size)]

    # 3. the loop: reward.run_phase steps 5.2-5.4 with one process and one micro-batch per step
    losses, times = [], []
    for step, items in enumerate(batches):
        t0 = time.perf_counter()
        batch = reward.collate_preferences(items, tok.pad_token_id)
        scores = forward.scores(net, batch.sequences)  # (2B,)
        loss_sum = reward.preference_loss_sum(scores, batch)
        accelerator.backward(loss_sum / len(items))
        loss = loss_sum.item() / len(items)  # waits for the step's compute, so the timer is honest
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)

    # 4. numbers
    backbone = accelerator.unwrap_model(net)
    total_params, non_emb = count_non_embedding_rm(backbone)
    flops_per_token = model_flops_per_token(backbone.config, cfg.max_length, lm_head_fraction=0.0)
    tokens_per_s = len(times) * 2 * cfg.batch_size * cfg.max_length / sum(times)
    achieved = tokens_per_s * flops_per_token
    return Result(
        model=args.model, dtype=precision, device=str(accelerator.device), seq_len=cfg.max_length,
        batch_size=2 * cfg.batch_size, warmup=args.warmup, steps=args.steps, params_total=total_params,
        params_non_embedding=non_emb, tokens_per_s=tokens_per_s, step_s_mean=sum(times) / len(times),
        step_s_min=min(times), step_s_max=max(times), flops_per_token=flops_per_token,
        achieved_tflops=achieved / 1e12, peak_gflops_bf16=peak_bf16, peak_gflops_fp32=peak_fp32,
        mfu=achieved / (peak * 1e9), peak_rss_mb=peak_rss_mb(), losses=losses, machine=machine_info(),
    )


def count_non_embedding_rm(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per response sequence")
    p.add_argument("--batch-size", type=int, default=4, help="prompts (pairs) per step; 2× as many sequences")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-seconds", type=float, default=3.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = run(args)
    print(HEADER.replace("| batch |", "| sequences |"))
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    print(table_row(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
