"""DPO training throughput, MFU and peak memory of rlhfkit's own DPO step, for each reference mode.

What runs: the code path of `rlhfkit.algos.dpo.train` on one process, one micro-batch per optimizer step:
`dpo.pair_losses` (chosen and rejected concatenated into one (2B, T) forward through `forward.SelectedLogits`,
summed response log-probs, the reference log-probs of the mode, `dpo_loss`) -> backward -> clipping -> AdamW ->
schedule, fp32 master weights under accelerate's autocast. Reference modes:
- precomputed: reference log-probs computed once before the timed steps (their cost is reported separately);
  training holds one model.
- copy: a frozen second model runs a no-grad forward on every batch.
- lora: the policy is a LoRA model (r=16, all linear layers); the reference is its base with the adapter off.

Data: `batch_size` pairs per step, every sequence exactly `seq_len` random ordinary token ids, loss on the
second half (the response). Peak RSS is per process, so run one mode per process (this script does one mode).

    python benchmarks/dpo_bench.py --model smollm2-135m --seq-len 512 --batch-size 4 --ref-mode precomputed
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
from sft_bench import HEADER, Result, count_non_embedding, ensure_cached, synthetic_rows, table_row  # noqa: E402

from rlhfkit import forward, models  # noqa: E402
from rlhfkit.algos import dpo  # noqa: E402
from rlhfkit.training import adamw, make_schedule  # noqa: E402


def run(args: argparse.Namespace) -> tuple[Result, float]:
    from accelerate import Accelerator

    precision = models.mixed_precision(args.dtype)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    peak_bf16 = matmul_peak(torch.bfloat16, seconds=args.peak_seconds, device=accelerator.device)
    peak_fp32 = matmul_peak(torch.float32, seconds=args.peak_seconds, device=accelerator.device)
    peak = {"bf16": peak_bf16, "no": peak_fp32}.get(precision, peak_bf16)

    # 1. policy, optimizer, schedule, as dpo.train builds them
    ensure_cached(args.model)
    steps = args.warmup + args.steps
    cfg = dpo.DPOConfig(model=args.model, max_length=args.seq_len, batch_size=args.batch_size, max_steps=steps,
                        dtype=args.dtype, seed=args.seed, ref_mode=args.ref_mode, lora=args.ref_mode == "lora",
                        output=str(args.workdir))
    tok = models.load_tokenizer(cfg.model)
    model = models.load_causal_lm(cfg.model, seed=cfg.seed, tokenizer=tok)
    if cfg.lora:
        model = models.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = make_schedule(optimizer, cfg, steps)
    net, optimizer = accelerator.prepare(forward.SelectedLogits(model), optimizer)

    seqs = synthetic_rows(tok, 2 * steps * cfg.batch_size, cfg.max_length, len(tok), cfg.seed)
    pairs = [dpo.PairExample(c, r, i, c.where) for i, (c, r) in enumerate(zip(seqs[0::2], seqs[1::2]))]
    t0 = time.perf_counter()
    reference = dpo.reference_fn(cfg.ref_mode, cfg, tok, net, {"train": pairs}, accelerator)
    reference_s = time.perf_counter() - t0  # precomputed: one pass over all pairs; other modes: set-up only

    # 2. the loop: dpo.train steps 5.2-5.4 with one process and one micro-batch per step
    losses, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = pairs[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        res = dpo.pair_losses(net, batch, "train", reference, cfg, tok.pad_token_id, accelerator.device)
        accelerator.backward(res.loss.mean())
        losses.append(res.loss.mean().item())  # waits for the step's compute
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)

    # 3. numbers: model FLOPs of the policy's forward + backward only (the reference forward is overhead)
    lm = accelerator.unwrap_model(net).lm
    total, non_emb = count_non_embedding(lm.get_base_model() if cfg.lora else lm)
    selected = cfg.max_length - cfg.max_length // 2
    flops_per_token = model_flops_per_token(lm.config, cfg.max_length, lm_head_fraction=selected / cfg.max_length)
    tokens_per_s = len(times) * 2 * cfg.batch_size * cfg.max_length / sum(times)
    achieved = tokens_per_s * flops_per_token
    result = Result(
        model=f"{args.model} ({args.ref_mode})", dtype=precision, device=str(accelerator.device),
        seq_len=cfg.max_length, batch_size=2 * cfg.batch_size, warmup=args.warmup, steps=args.steps,
        params_total=total, params_non_embedding=non_emb, tokens_per_s=tokens_per_s,
        step_s_mean=sum(times) / len(times), step_s_min=min(times), step_s_max=max(times),
        flops_per_token=flops_per_token, achieved_tflops=achieved / 1e12, peak_gflops_bf16=peak_bf16,
        peak_gflops_fp32=peak_fp32, mfu=achieved / (peak * 1e9), peak_rss_mb=peak_rss_mb(), losses=losses,
        machine=machine_info(),
    )
    return result, reference_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (response = second half)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step; 2× as many sequences")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ref-mode", default="precomputed", choices=["precomputed", "copy", "lora"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-seconds", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rlhfkit-dpo-bench"), help="where ref_logps.pt goes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result, reference_s = run(args)
    print(HEADER.replace("| batch |", "| sequences |"))
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    print(table_row(result))
    print(f"reference set-up: {reference_s:.1f} s ({args.ref_mode})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**asdict(result), "reference_setup_s": reference_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
