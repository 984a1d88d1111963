"""Supervised fine-tuning (SFT): cross-entropy on demonstrations, assistant tokens only.

Paper: Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
(InstructGPT), §3.5 and Appendix C.1: SFT on labeller demonstrations, cosine decay to 10% of the peak
learning rate, 16 epochs (they overfit validation loss after one epoch, yet more epochs kept improving RM
score and human preference, so pick the checkpoint downstream, not by validation loss).

Each optimizer step of `train`'s loop, top to bottom (the code's step comments number them 5.1–5.5, after
the set-up steps 1–4):
  5.1. take this step's global batch (a seeded permutation per epoch: the data position is just the step)
  5.2. this process's micro-batches: forward, token-summed NLL / tokens in the whole global batch, backward
  5.3. stop (or skip, with --skip-nonfinite) on a non-finite loss or gradient
  5.4. clip, optimizer and scheduler step
  5.5. log, evaluate, checkpoint

Departures from the paper, and why:
- Loss is the mean over all trained tokens of the global batch (every token weighs the same whatever the
  micro-batch or process it lands in), so 2 processes × batch b equals 1 process × 2b up to rounding.
- Residual dropout 0.2 is not applied: Llama-family models have none; the models' own dropout is kept.
- Every assistant turn of a multi-turn conversation carries loss, in one pass (see rlhfkit/data/chat.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from rlhfkit import TrainingError, checkpoint, distributed, forward, models
from rlhfkit.config import write_run_json
from rlhfkit.data import chat, formats
from rlhfkit.data.collate import pack
from rlhfkit.tracking import release_output
from rlhfkit.training import (TrainConfig, adamw, begin, for_training, global_batch_rows, make_schedule, micro_batches,
                              plan_steps, split_validation, start_run, update)


@dataclass
class SFTConfig(TrainConfig):
    """rlhfkit sft: supervised fine-tuning on demonstrations (loss on assistant tokens only)."""

    RETOLD: ClassVar[dict[str, str]] = {"epochs": "Passes over the data (InstructGPT trained its SFT model for 16)."}

    model: str = "smollm2-135m"
    """Model to fine-tune: an alias (smollm2-135m, tiny-llama), a Hugging Face directory, a .gguf file or a hub id."""
    data: str = "sample:conversations"
    """Training data (.jsonl/.json/.parquet/.csv/save_to_disk dir, or sample:NAME for bundled samples)."""
    output: str = "runs/sft"
    """Output directory: final model, checkpoints, metrics.jsonl, TensorBoard events, run.json."""
    packing: bool = False
    """Pack whole examples into rows of max_length (no cross-example attention)."""


# --- data -------------------------------------------------------------------------------------------------


def load_data(cfg: SFTConfig, tok, main: bool) -> tuple[list, list, chat.TokenizeReport, chat.TokenizeReport,
                                                         formats.Skipped | None]:
    """Step 2: training and validation rows (`chat.TokenizedExample`, packed with --packing), what tokenising did
    to each set (printed on the main process when it dropped or cut anything) and the rows skipped as invalid
    (with --skip-invalid)."""
    skipped = formats.Skipped() if cfg.skip_invalid else None
    convs = formats.read(cfg.data, formats.to_conversation, cfg.format, skipped, cfg.columns)[0]
    if cfg.val_data:
        train_convs, val_convs = convs, formats.read(cfg.val_data, formats.to_conversation, None, skipped, cfg.columns)[0]
    else:
        train_convs, val_convs = split_validation(convs, cfg.val_fraction, cfg.seed)
    train_rows, report = chat.tokenize_conversations(tok, train_convs, cfg.max_length)
    val_rows, val_report = chat.tokenize_conversations(tok, val_convs, cfg.max_length)
    if not train_rows:
        raise TrainingError(f"no trainable examples in {cfg.data} ({report.skipped()}; --max-length is "
                            f"{cfg.max_length})")
    if cfg.packing:
        train_rows = pack(train_rows, cfg.max_length)
    if main and (report.truncated or report.skipped_no_loss or report.skipped_empty):
        print(f"data: {report.truncated} examples truncated to {cfg.max_length} tokens, {report.skipped()}")
    if main and skipped and skipped.count:
        print(skipped.line())
    return train_rows, val_rows, report, val_report, skipped


# --- one forward ------------------------------------------------------------------------------------------


def batch_nll(model, batch: forward.Batch, device) -> torch.Tensor:
    """Summed NLL of the trained tokens of one micro-batch (scalar, fp32), the LM head in chunks."""
    return -forward.token_logps(model, batch.to(device)).sum()


@torch.no_grad()
def evaluate(model, rows, cfg: SFTConfig, pad_id: int, accelerator) -> float:
    """Token-mean validation NLL over all processes (on the unwrapped module: no DDP sync for uneven shards)."""
    model = distributed.unwrap(model)
    model.eval()
    nll = torch.zeros(2, device=accelerator.device)
    for mb, real in micro_batches(rows, accelerator, cfg.batch_size):
        batch = forward.rows(mb, pad_id)
        nll[0] += batch_nll(model, batch, accelerator.device) * real
        nll[1] += len(batch.targets) * real
    model.train()
    nll = accelerator.reduce(nll, "sum")
    return (nll[0] / nll[1].clamp(min=1)).item()


# --- training ---------------------------------------------------------------------------------------------


def build_model(cfg: SFTConfig, tok):
    return for_training(models.load_causal_lm(cfg.model, seed=cfg.seed, tokenizer=tok), cfg)


def train(cfg: SFTConfig) -> dict:
    # 1. setup: processes, precision, seed, model
    accelerator, out = begin(cfg)
    main = accelerator.is_main_process
    tok = models.load_tokenizer(cfg.model)
    model = build_model(cfg, tok)
    model.train()

    # 2. data: render, mask, truncate (counted), hold out validation, optionally pack
    train_rows, val_rows, report, val_report, skipped = load_data(cfg, tok, main)
    data_report = {**report.as_dict(), "data/val_examples": val_report.examples,
                   **({"data/skipped_invalid": skipped.count} if skipped else {})}
    world = accelerator.num_processes
    global_batch, steps_per_epoch, total_steps = plan_steps(cfg, len(train_rows), world)

    # 3. the model spread over the processes (--sharding), optimizer and schedule (the scheduler is stepped by hand,
    # once per optimizer step)
    net = distributed.prepare_model(forward.SelectedLogits(model), cfg.sharding, accelerator)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = make_schedule(optimizer, cfg, total_steps)
    net, optimizer = distributed.prepare_optimizer(net, optimizer, cfg, accelerator)

    # 4. resume
    ckpt_root = out / "checkpoints"
    start = start_run(out, cfg, "sft", {"step": 0, "tokens": 0, "nonfinite_skipped": 0}, net, optimizer, scheduler,
                      accelerator, total_steps, data_report)
    if start.finished is not None:
        return start.finished
    state, tracker = start.state, start.tracker

    # 5. the loop
    bar = tqdm(total=total_steps, initial=state["step"], disable=not main, desc="sft", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    t_last = time.perf_counter()
    tokens_since = 0
    lengths = [len(r.input_ids) for r in train_rows] if cfg.group_by_length else None
    while state["step"] < total_steps:
        step = state["step"]
        # 5.1 this step's rows; this process takes every world-th row, in grad_accum micro-batches
        rows = [train_rows[i] for i in global_batch_rows(step, len(train_rows), global_batch, cfg.seed, lengths)]
        n_loss_tokens = max(sum(sum(r.loss_mask[1:]) for r in rows), 1)
        step_tokens = sum(len(r.input_ids) for r in rows)
        micro = micro_batches(rows, accelerator, cfg.batch_size)
        weight = world / n_loss_tokens
        # 5.2 forward/backward; DDP averages gradients over processes, hence world / tokens of the global batch
        loss_sum = torch.zeros((), device=accelerator.device)
        for j, (mb, real) in enumerate(micro):
            with distributed.gradient_sync([net], j == len(micro) - 1):
                nll = batch_nll(net, forward.rows(mb, tok.pad_token_id), accelerator.device)
                distributed.backward(nll * weight * real, net, accelerator)
            loss_sum += nll.detach() * real
        loss = accelerator.reduce(loss_sum, "sum").item() / n_loss_tokens
        # 5.3–5.4 clip, guard against non-finite values and stalls, update
        done = update(loss, net, params, optimizer, scheduler, state, cfg, accelerator, bar, ckpt_root, rows[0].where)
        if done is None:
            continue
        lr, grad_norm = done
        state["tokens"] += step_tokens
        tokens_since += step_tokens
        step = state["step"]
        bar.set_postfix(loss=f"{loss:.4f}")
        # 5.5 log, evaluate, checkpoint
        if step % cfg.log_steps == 0 or step == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/epoch": step / steps_per_epoch, "train/tokens": state["tokens"],
                       "perf/tokens_per_s": tokens_since / (now - t_last)}
            tracker.log(step, metrics)
            t_last, tokens_since = now, 0
        if val_rows and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
            metrics["val/loss"] = evaluate(net, val_rows, cfg, tok.pad_token_id, accelerator)
            tracker.log(step, {"val/loss": metrics["val/loss"]})
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps):
            checkpoint.save(ckpt_root, step, net, optimizer, scheduler, state, accelerator, cfg.save_total_limit,
                            cfg)
    bar.close()

    # 6. save a Hugging Face directory that plain transformers loads
    final = {**metrics, "train/steps": state["step"], "train/nonfinite_skipped": state["nonfinite_skipped"]}
    weights = distributed.full_state_dict(net, strip="lm.")  # gathered by every process (None: not sharded)
    if main:
        models.save_pretrained(distributed.unwrap(net).lm, tok, out, merge=cfg.lora and cfg.merge,
                               state_dict=weights)
        write_run_json(out, cfg, "sft", final, {**distributed.report(net, params, optimizer, accelerator),
                                                "data": {**data_report, **(skipped.as_dict() if skipped else {})}})
    tracker.close()
    release_output(out)
    accelerator.wait_for_everyone()
    return final

