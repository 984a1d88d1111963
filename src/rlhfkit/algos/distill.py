"""Context distillation: train a model to answer without a long prompt as it answers with it.

Paper: Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", §3.4 (context
distillation): sample from the model prompted with a helpful-honest-harmless (HHH) context C, then fine-tune the
model without C to minimise KL(p(X | C) ‖ p_θ(X)) on those samples, token by token. Bai et al. 2022 started their HH
assistant's RLHF from such a context-distilled model.

`train`, top to bottom:
  1. setup: processes, precision, seed, OUTPUT
  2. samples: each prompt after the context (the context is the system message), `--n` samples each from the
     starting model through the rollout engine `generate` uses; written to OUTPUT/samples.jsonl, which a resumed run
     reads back instead of sampling again
  3. data: each sample tokenised twice, the student's view (prompt + response) and the teacher's (context + prompt +
     response); the response's tokens are the same in both, as turns are encoded piece by piece (data/chat.py)
  4. the teacher, a frozen copy of the starting model; the student, optimizer and schedule; resume
  5. the loop: this step's rows; per micro-batch the student's logits (M, V) at the response positions, the
     teacher's at the same tokens, loss = Σ KL(p_teacher ‖ p_student) / response tokens of the global batch;
     clip and step as SFT does; held-out KL at step 0, every --eval-steps and at the end
  6. save a Hugging Face directory

Departures from the paper, and why:
- The context is a system message, since chat models take instructions there; the paper prepended raw dialogue
  text. A prompt's own system message follows the context in the same message.
- Only response tokens are distilled: the prompt is the user's text, not the model's.
- The KL is exact over the whole vocabulary (both distributions are at hand), not estimated from samples.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from rlhfkit import DataError, UsageError, checkpoint, distributed, forward, models
from rlhfkit.config import write_run_json
from rlhfkit.core.losses import token_kl
from rlhfkit.data import chat, formats, io
from rlhfkit.rollout import EngineConfig
from rlhfkit.rollout.sampling import SamplingConfig, generation_settings, sample, sample_rows
from rlhfkit.tracking import release_output
from rlhfkit.training import (RunConfig, adamw, begin, for_training, global_batch_rows, make_schedule, micro_batches,
                              plan_steps, split_validation, start_run, update)

CONTEXTS = Path(__file__).parent.parent / "contexts"  # shipped contexts: --context NAME


@dataclass
class DistillConfig(RunConfig, EngineConfig):
    """rlhfkit distill-context: train a model to answer without a long context (an HHH prompt) as it does with it."""

    model: str = "smollm2-135m"
    """Model to distil (teacher and starting student): an alias, a Hugging Face directory, a .gguf file or a hub id."""
    context: str = "hhh"
    """The context to distil: a text file, or the name of a shipped one (hhh: a helpful-honest-harmless prompt with
    a few example conversations)."""
    prompts: str = "sample:prompts"
    """Prompts to sample on: any format with a prompt, or sample:NAME / sim:SPLIT."""
    output: str = "runs/distill"
    """Output directory: final model, samples.jsonl, checkpoints, metrics.jsonl, TensorBoard events, run.json."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the prompted model."""
    max_new_tokens: int = 128
    """Longest sampled response in tokens."""
    max_length: int = 1024
    """Longest teacher sequence (context + prompt + response) in tokens; longer samples are skipped (counted)."""
    val_fraction: float = 0.1
    """Fraction of the prompts held out to measure the KL on samples the student never trained on."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    epochs: int = 1
    """Passes over the samples."""
    max_steps: int = -1
    """Optimizer steps to run; overrides `epochs` when > 0."""
    batch_size: int = 8
    """Samples per micro-batch on each process (and sequences per forward pass when sampling)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = batch_size × grad_accum × processes."""
    eval_steps: int = 0
    """Measure the held-out KL every N steps (0: at the start and the end only)."""


class DistillExample(NamedTuple):
    """One sample seen twice; the loss-carrying tokens of the two are the same response tokens, in order."""

    student: chat.TokenizedExample  # prompt + response (T_s,)
    teacher: chat.TokenizedExample  # context + prompt + response (T_t,)
    prompt_index: int


def read_context(name: str) -> str:
    shipped = CONTEXTS / f"{name}.txt"
    path = shipped if "/" not in name and shipped.is_file() else Path(name).expanduser()
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in CONTEXTS.glob("*.txt")))
        raise UsageError(f"--context {name!r}: no such file, and no shipped context of that name ({valid})")
    text = path.read_text().strip()
    if not text:
        raise UsageError(f"--context {name!r}: the file is empty")
    return text


def with_context(messages: formats.Messages, context: str) -> formats.Messages:
    """The prompt as the teacher sees it: the context as the system message, before the prompt's own one."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{context}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


# --- steps 2–3: samples and their two views -------------------------------------------------------------------


def draw_samples(cfg: DistillConfig, context: str, path: Path, main: bool, accelerator) -> list[dict]:
    """Step 2: OUTPUT/samples.jsonl, written by the main process (every process reads it), or read back."""
    if main and not path.is_file():
        contexted = path.with_name("prompts_with_context.jsonl")
        prompts, _ = formats.read(cfg.prompts, formats.to_prompt)
        io.write_jsonl(contexted, ({"messages": with_context(p.messages, context), "source": p.where}
                                   for p in prompts))
        sampling = SamplingConfig(**{k: getattr(cfg, k) for k in EngineConfig.__dataclass_fields__},
                                  prompts=str(contexted), n=cfg.n, temperature=cfg.temperature,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                                  dtype=cfg.dtype)
        _, _, samples, _ = sample(sampling, cfg.model)
        rows = list(sample_rows(prompts, samples, generation_settings(sampling, cfg.model)))  # prompts without C
        io.write_jsonl(path.with_suffix(".tmp"), rows)
        path.with_suffix(".tmp").rename(path)  # a half-written file never passes for the samples
    accelerator.wait_for_everyone()
    return [r.data for r in io.read_rows(path)]


def tokenize(tok, rows: list[dict], context: str, max_length: int, where: str) -> tuple[list[DistillExample], int]:
    """Step 3: each sample's two views; those whose teacher sequence exceeds `max_length` are left out and counted
    (cutting it would distil a truncated context)."""
    out, too_long = [], 0
    for i, r in enumerate(rows):
        prompt, response = r["prompt"], [{"role": "assistant", "content": r["response"]}]
        student = chat.tokenize_response(tok, prompt, response, f"{where}:{i + 1}")
        teacher = chat.tokenize_response(tok, with_context(prompt, context), response, f"{where}:{i + 1}")
        if len(teacher.input_ids) > max_length:
            too_long += 1
            continue
        s_targets = [t for t, m in zip(student.input_ids, student.loss_mask) if m]
        t_targets = [t for t, m in zip(teacher.input_ids, teacher.loss_mask) if m]
        if s_targets != t_targets:  # the template rendered the response differently after the context
            raise DataError(f"{where}:{i + 1}: the response's tokens differ with and without the context")
        if s_targets:
            out.append(DistillExample(student, teacher, r["prompt_index"]))
    return out, too_long


# --- one forward ----------------------------------------------------------------------------------------------


def batch_kl(student_net, teacher_net, rows: list[DistillExample], pad_id: int, device) -> torch.Tensor:
    """Summed KL(p_teacher ‖ p_student) over the response tokens of a micro-batch (scalar, fp32)."""
    student = forward.logits(student_net, forward.rows([r.student for r in rows], pad_id).to(device))  # (M, V)
    with torch.no_grad():
        teacher = forward.logits(teacher_net, forward.rows([r.teacher for r in rows], pad_id).to(device))  # (M, V)
    return token_kl(student, teacher).sum()


@torch.no_grad()
def evaluate(net, teacher_net, rows: list[DistillExample], cfg: DistillConfig, pad_id: int, accelerator) -> float:
    """Token-mean KL(p_teacher ‖ p_student) on held-out samples, over all processes."""
    model = distributed.unwrap(net)
    model.eval()
    kl = torch.zeros(2, device=accelerator.device)
    for mb, real in micro_batches(rows, accelerator, cfg.batch_size):
        kl[0] += batch_kl(model, teacher_net, mb, pad_id, accelerator.device) * real
        kl[1] += sum(sum(r.student.loss_mask) for r in mb) * real
    model.train()
    kl = accelerator.reduce(kl, "sum")
    return (kl[0] / kl[1].clamp(min=1)).item()


# --- training -------------------------------------------------------------------------------------------------


def train(cfg: DistillConfig) -> dict:
    # 1. setup (a missing context is an error before OUTPUT is claimed)
    context = read_context(cfg.context)
    accelerator, out = begin(cfg)
    main = accelerator.is_main_process
    tok = models.load_tokenizer(cfg.model)

    # 2–3. samples from the prompted model, each seen with and without the context; prompts held out for the KL
    samples = draw_samples(cfg, context, out / "samples.jsonl", main, accelerator)
    examples, too_long = tokenize(tok, samples, context, cfg.max_length, str(out / "samples.jsonl"))
    prompt_ids = sorted({e.prompt_index for e in examples})
    held_out = set(split_validation(prompt_ids, cfg.val_fraction, cfg.seed)[1])
    train_rows = [e for e in examples if e.prompt_index not in held_out]
    val_rows = [e for e in examples if e.prompt_index in held_out]
    if not train_rows:
        raise DataError(f"{cfg.prompts}: no sample left to train on ({too_long} longer than --max-length "
                        f"{cfg.max_length} with the context)")
    data_report = {"data/samples": len(samples), "data/examples": len(train_rows), "data/val_examples": len(val_rows),
                   "data/skipped_too_long": too_long}
    if main and too_long:
        print(f"data: {too_long} samples skipped: context + prompt + response is longer than --max-length "
              f"{cfg.max_length}")
    global_batch, steps_per_epoch, total_steps = plan_steps(cfg, len(train_rows), accelerator.num_processes)

    # 4. teacher (frozen, the starting model), student, optimizer, schedule, resume
    teacher = models.load_causal_lm(cfg.model, seed=cfg.seed, tokenizer=tok).to(accelerator.device).eval()
    teacher.requires_grad_(False)
    teacher_net = forward.SelectedLogits(teacher)
    model = for_training(models.load_causal_lm(cfg.model, seed=cfg.seed, tokenizer=tok), cfg)
    model.train()
    net = distributed.prepare_model(forward.SelectedLogits(model), cfg.sharding, accelerator)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = make_schedule(optimizer, cfg, total_steps)
    net, optimizer = distributed.prepare_optimizer(net, optimizer, cfg, accelerator)
    ckpt_root = out / "checkpoints"
    start = start_run(out, cfg, "distill-context", {"step": 0, "nonfinite_skipped": 0}, net, optimizer, scheduler,
                      accelerator, total_steps, data_report)
    if start.finished is not None:
        return start.finished
    state, tracker = start.state, start.tracker
    kl_of = functools.partial(evaluate, teacher_net=teacher_net, cfg=cfg, pad_id=tok.pad_token_id,
                              accelerator=accelerator)
    metrics: dict[str, float] = {}
    if val_rows and state["step"] == 0:  # where the student starts: the KL the context makes
        metrics["val/kl"] = kl_of(net, rows=val_rows)
        tracker.log(0, {"val/kl": metrics["val/kl"]})

    # 5. the loop
    bar = tqdm(total=total_steps, initial=state["step"], disable=not main, desc="distill", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    world = accelerator.num_processes
    while state["step"] < total_steps:
        step = state["step"]
        rows = [train_rows[i] for i in global_batch_rows(step, len(train_rows), global_batch, cfg.seed)]
        n_tokens = max(sum(sum(r.student.loss_mask) for r in rows), 1)
        micro = micro_batches(rows, accelerator, cfg.batch_size)
        loss_sum = torch.zeros((), device=accelerator.device)
        for j, (mb, real) in enumerate(micro):
            with distributed.gradient_sync([net], j == len(micro) - 1):
                kl = batch_kl(net, teacher_net, mb, tok.pad_token_id, accelerator.device)
                distributed.backward(kl * (world / n_tokens) * real, net, accelerator)
            loss_sum += kl.detach() * real
        loss = accelerator.reduce(loss_sum, "sum").item() / n_tokens
        done = update(loss, net, params, optimizer, scheduler, state, cfg, accelerator, bar, ckpt_root,
                      rows[0].student.where)
        if done is None:
            continue
        lr, grad_norm = done
        step = state["step"]
        tokens_since += n_tokens
        bar.set_postfix(kl=f"{loss:.4f}")
        if step % cfg.log_steps == 0 or step == total_steps:
            now = time.perf_counter()
            # train/loss is the token-mean KL(p_teacher ‖ p_student) of the step's samples
            metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/epoch": step / steps_per_epoch, "perf/tokens_per_s": tokens_since / (now - t_last)}
            tracker.log(step, metrics)
            t_last, tokens_since = now, 0
        if val_rows and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
            metrics["val/kl"] = kl_of(net, rows=val_rows)
            tracker.log(step, {"val/kl": metrics["val/kl"]})
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps):
            checkpoint.save(ckpt_root, step, net, optimizer, scheduler, state, accelerator, cfg.save_total_limit, cfg)
    bar.close()

    # 6. an ordinary Hugging Face model, which answers without the context
    final = {**metrics, "train/steps": state["step"], "train/nonfinite_skipped": state["nonfinite_skipped"]}
    weights = distributed.full_state_dict(net, strip="lm.")
    if main:
        models.save_pretrained(distributed.unwrap(net).lm, tok, out, merge=cfg.lora and cfg.merge, state_dict=weights)
        write_run_json(out, cfg, "distill-context", final,
                       {**distributed.report(net, params, optimizer, accelerator), "data": data_report})
    tracker.close()
    release_output(out)
    accelerator.wait_for_everyone()
    return final
