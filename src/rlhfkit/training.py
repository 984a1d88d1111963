"""What the trainers (SFT, RM, DPO, PPO) share: the common config fields, step 1 (`begin`, `for_training`), the
data order and step plan, the learning-rate schedule, the start of the loop (`start_run`), the update with its
non-finite and stalled-gradient guards (`update`), and typed statistics sums. Small pieces only, no base class:
each algorithm file keeps its own loop, top to bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from tqdm.auto import tqdm

from rlhfkit import TrainingError, checkpoint, distributed
from rlhfkit.fast import layers
from rlhfkit.tracking import Tracker, claim_output, release_output


@dataclass
class RunConfig:
    """Fields common to every trainer: optimisation, adapters, precision, seeding, logging and checkpoints. Each
    command's config subclasses it (or TrainConfig), and may re-document or re-default a field by declaring it
    again."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly from 0."""
    schedule: str = "cosine"
    """Learning-rate decay after warm-up: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak (InstructGPT: cosine to 10%)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    lora: bool = False
    """Train a LoRA adapter instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    """Module names that get LoRA adapters."""
    merge: bool = False
    """With --lora, also save the merged model under OUTPUT/merged."""
    freeze_layers: int = 0
    """Freeze the embeddings and the first N transformer blocks."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: much less memory for
    about a third more compute (TRL's default)."""
    compile: bool = False
    """torch.compile each transformer block for the training passes (needs a C++ compiler on the CPU): less
    activation memory and steps 1.02–1.34× faster after about 40 s of compiling; a trained prompt is then not split
    off as a shared prefix (benchmarks/RESULTS.md, "Compiled transformer blocks")."""
    dtype: str = "auto"
    """Compute precision: auto (bf16 autocast where the hardware has it), bf16, fp16 or fp32. Weights stay fp32."""
    seed: int = 0
    """Seed for data order, initialisation of random models and sampling."""
    log_steps: int = 1
    """Log training metrics every N steps."""
    save_steps: int = 0
    """Write a resumable checkpoint every N steps (0: none but the final model)."""
    save_total_limit: int = 2
    """How many checkpoints to keep."""
    resume: bool = False
    """Continue from OUTPUT/checkpoints/latest if there is one."""
    overwrite: bool = False
    """Replace what an earlier run left in OUTPUT (without it, or --resume, a non-empty OUTPUT is refused)."""
    skip_nonfinite: int = 0
    """Skip up to N batches whose loss or gradient is not finite (with a warning each) instead of stopping."""
    sharding: str = "ddp"
    """With several processes, how the trained model is spread over them: ddp (a whole copy on each), fsdp2
    (parameters, gradients and optimizer state split over them with torch's FSDP2), zero2 or zero3 (DeepSpeed's
    ZeRO: gradients and optimizer state split, and with zero3 the parameters too); docs/distributed.md."""


def adamw(params, cfg: RunConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the config's betas and weight decay (params: tensors or param groups with their own lr).

    torch's fused kernel updates each tensor in one pass instead of a dozen element-wise foreach passes: an
    optimizer step over SmolLM2's 135M parameters is about 4× faster on this CPU, which matters at the small
    batches of PPO and DPO, where the step is a large share of the time. Same update up to float rounding (tested).
    """
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay,
                             betas=tuple(cfg.adam_betas), fused=True)


@dataclass
class TrainConfig(RunConfig):
    """RunConfig plus the fields of trainers that make passes over a fixed data set (SFT, RM, DPO)."""

    format: str | None = None
    """Data format; detected from the columns when not given."""
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to rlhfkit's, FILE=OURS (`--columns rating=scores answers=responses`), for a layout
    whose columns are named otherwise; keys inside `completions` objects too."""
    skip_invalid: bool = False
    """Skip the rows that cannot be converted (e.g. an HH pair whose transcripts share no prompt) instead of stopping
    at the first; they are counted, and the first few named (file:line), in the log and in run.json."""
    val_data: str | None = None
    """Validation data; when not given, a seeded `val_fraction` of the training data is held out."""
    val_fraction: float = 0.05
    """Fraction of the training data held out for validation when `val_data` is not given (0 disables)."""
    max_length: int = 512
    """Longest sequence in tokens; longer examples keep their start and lose their end (counted)."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int = -1
    """Optimizer steps to run; overrides `epochs` when > 0."""
    batch_size: int = 8
    """Rows per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = batch_size × grad_accum × processes."""
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end)."""
    group_by_length: bool = False
    """Batch examples of similar length together (within mega-batches of 8 global batches, longest first): less
    padding, a less random order."""


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded `fraction` (at least one item) of `items`; order is kept on both sides."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_val = max(1, round(len(items) * fraction))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(perm[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


GROUP_BATCHES = 8  # global batches per mega-batch of `group_by_length`


def global_batch_rows(step: int, n_rows: int, global_batch: int, seed: int,
                      lengths: list[int] | None = None) -> list[int]:
    """Row indices of optimizer step `step`: a seeded permutation per epoch, cut into global batches.

    With `lengths` (one per row: what its padded batch costs), length-grouped: the permutation is cut into
    mega-batches of GROUP_BATCHES global batches and each is sorted longest first before the cut, so a batch holds
    rows of similar length and pads less (transformers' `group_by_length`, with mega-batches of 8 batches rather
    than 50, so the order stays close to random). The data position is just the step number, so resuming needs no
    sampler state."""
    steps_per_epoch = math.ceil(n_rows / global_batch)
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if lengths is not None:  # only the step's own mega-batch needs sorting
        size = GROUP_BATCHES * global_batch
        mega = slice(i // GROUP_BATCHES * size, (i // GROUP_BATCHES + 1) * size)
        perm[mega] = sorted(perm[mega], key=lambda r: -lengths[r])
    return perm[i * global_batch:(i + 1) * global_batch]


def make_schedule(optimizer, cfg: RunConfig, total_steps: int):
    """Linear warm-up, then cosine/linear/constant decay to `min_lr_ratio` × peak; stepped once per update."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
        if cfg.schedule not in decay:
            raise TrainingError(f"--schedule {cfg.schedule!r}: expected cosine, linear or constant")
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay[cfg.schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def skip_nonfinite(loss: float, grad_norm: float, state: dict, cfg: RunConfig, ckpt_root: Path, where: str,
                   main: bool) -> bool:
    """False when loss and gradient are finite. Otherwise stop with a TrainingError naming the step, the batch
    and the last good checkpoint, or, while the `--skip-nonfinite` budget lasts, count the skip, warn and
    return True (the caller then drops the gradients and moves on)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return False
    step = state["step"] + 1
    if state["nonfinite_skipped"] >= cfg.skip_nonfinite:
        raise TrainingError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
            f"(loss {loss}, grad norm {grad_norm}; batch starting at {where}); last good "
            f"checkpoint: {checkpoint.latest(ckpt_root) or 'none'}. Lower --lr, or pass --skip-nonfinite N.")
    state["nonfinite_skipped"] += 1
    if main:
        tqdm.write(f"warning: skipped step {step}: non-finite loss/gradient "
                   f"({state['nonfinite_skipped']}/{cfg.skip_nonfinite})")
    return True


STALLED_STEPS = 3  # optimizer steps in a row with a gradient of exactly 0 before a run is called stalled


def check_stalled(loss: float, grad_norm: float, state: dict, cfg: RunConfig) -> None:
    """Stop a run whose gradient has been exactly 0 for STALLED_STEPS steps in a row (counted in `state`, so it
    survives a resume). SFT, RM and DPO losses always have a gradient; none at all means the model is saturated,
    typically by a learning rate far too high (an LM at loss ≈ ln V then outputs a uniform distribution), and
    would otherwise end "successfully" with an untrained model. PPO does not use it: a batch whose rewards are all
    equal legitimately gives no policy gradient."""
    state["zero_grad_steps"] = state.get("zero_grad_steps", 0) + 1 if grad_norm == 0 else 0
    if state["zero_grad_steps"] >= STALLED_STEPS:
        step = state["step"] + 1
        raise TrainingError(
            f"the gradient has been exactly 0 for {STALLED_STEPS} steps in a row (steps {step - STALLED_STEPS + 1}–"
            f"{step}, loss {loss:.4g}): the model has stopped learning, typically saturated by too high a "
            f"learning rate (--lr {cfg.lr:g}). Lower --lr and run again.")


S = TypeVar("S", bound=NamedTuple)


def zero_sums(cls: type[S], device) -> S:
    """A NamedTuple of statistics sums (scalar tensors), all 0."""
    return cls._make(torch.zeros((), device=device) for _ in cls._fields)


def add_sums(a: S, b: S, keep: bool = True) -> S:
    """a + b field by field; `keep` False adds nothing (a process's weight-0 stand-in micro-batch)."""
    return type(a)._make(x + y * keep for x, y in zip(a, b))


def reduce_sums(sums: S, accelerator) -> S:
    """The sums over every process, in one all-reduce of their (K,) vector."""
    return type(sums)._make(accelerator.reduce(torch.stack([v.float() for v in sums]), "sum").unbind())


def means(sums: NamedTuple, n: float, prefix: str) -> dict[str, float]:
    """{prefix/field: sum / n} for logging."""
    return {f"{prefix}/{k}": (v / max(n, 1)).item() for k, v in sums._asdict().items()}


def accelerator_for(dtype: str):
    """The run's accelerate `Accelerator`: the autocast precision `--dtype` resolves to, on CUDA where there is
    one (several processes when launched with accelerate or torchrun)."""
    from accelerate import Accelerator

    from rlhfkit import models

    return Accelerator(mixed_precision=models.mixed_precision(dtype), cpu=not torch.cuda.is_available())


def begin(cfg: RunConfig):
    """Step 1 of every trainer: its accelerator (`accelerator_for`), the global seed, and OUTPUT claimed by the main
    process (`tracking.claim_output`). Returns (accelerator, OUTPUT as a Path)."""
    distributed.from_launcher(cfg)
    distributed.check(cfg)
    accelerator = accelerator_for(cfg.dtype)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    if accelerator.is_main_process:
        claim_output(out, cfg.resume, cfg.overwrite)
    return accelerator, out


class Plan(NamedTuple):
    global_batch: int  # rows per optimizer step over all processes: batch_size × grad_accum × processes
    steps_per_epoch: int
    total_steps: int  # --max-steps when > 0, else --epochs passes


def plan_steps(cfg: TrainConfig, n_rows: int, processes: int) -> Plan:
    """How many optimizer steps a run over `n_rows` makes, and of how many rows each."""
    global_batch = cfg.batch_size * cfg.grad_accum * processes
    per_epoch = math.ceil(n_rows / global_batch)
    return Plan(global_batch, per_epoch, cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch)


def micro_batches(rows: list, accelerator, batch_size: int) -> list[tuple[list, bool]]:
    """This process's share of a step's global batch (every world-th row), cut into micro-batches of `batch_size`,
    each with whether it holds real rows. Every process gets as many micro-batches as the busiest one: where a
    process has no rows left it runs one row with weight 0 (`rows[:1]`, False), or DDP would wait forever for its
    gradients and FSDP2 for its parameter gathers."""
    world = accelerator.num_processes
    mine = rows[accelerator.process_index::world]
    count = max(1, math.ceil(math.ceil(len(rows) / world) / batch_size))  # the busiest process's
    return [(mine[i:i + batch_size], True) if mine[i:i + batch_size] else (rows[:1], False)
            for i in range(0, count * batch_size, batch_size)]


class Update(NamedTuple):
    lr: float  # the learning rate the step used
    grad_norm: float  # the global gradient norm before clipping


def update(loss: float, net, params, optimizer, scheduler, state: dict, cfg: RunConfig, accelerator, bar,
           ckpt_root: Path, where: str) -> Update | None:
    """Steps 3–4 of the SFT, RM and DPO loops, which must stay alike: clip the gradient; stop, or skip the step,
    on a non-finite loss or gradient (`skip_nonfinite`: a skipped step still advances the step count and the
    schedule; returns None); stop a stalled run (`check_stalled`); else the optimizer step
    (`distributed.step`: `net` is the model as the loop calls it, a ZeRO engine steps itself), and the scheduler's.
    `state["step"]` and the progress bar advance either way."""
    def skip(grad_norm: float) -> bool:
        if skip_nonfinite(loss, grad_norm, state, cfg, ckpt_root, where, accelerator.is_main_process):
            return True
        check_stalled(loss, grad_norm, state, cfg)
        return False

    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    lr = scheduler.get_last_lr()[0]
    grad_norm = distributed.step(net, params, optimizer, clip, accelerator, skip)
    scheduler.step()
    state["step"] += 1
    bar.update(1)
    return None if grad_norm is None else Update(lr, grad_norm)


def for_training(model, cfg: RunConfig, task_type: str = "CAUSAL_LM"):
    """The model as every trainer trains it: the embeddings and the first --freeze-layers blocks frozen, blocks
    compiled (--compile) and/or recomputed in the backward pass (--gradient-checkpointing), then, with --lora, a
    LoRA adapter of the peft `task_type` around it."""
    from rlhfkit import models

    models.freeze_layers(model, cfg.freeze_layers)
    if cfg.compile:
        layers.compile_layers(model)
    if cfg.gradient_checkpointing:
        layers.checkpoint_layers(model)
    if cfg.lora:
        trained = getattr(cfg, "policy", None) or getattr(cfg, "model")  # ppo's --policy, the others' --model
        model = models.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, task_type,
                                  models.adapter_base(trained, cfg.seed))
    return model


class Start(NamedTuple):
    """How a trainer's loop starts (`start_run`)."""

    state: dict  # the trainer state: from the checkpoint, or the fresh one given
    resumed_from: Path | None  # the checkpoint, or None for a fresh start
    tracker: Tracker | None  # metrics.jsonl and TensorBoard, from the step the run continues at
    finished: dict | None  # a resumed run that had finished: its final metrics, and nothing left to do


def start_run(out: Path, cfg: RunConfig, command: str, fresh: dict, net, optimizer, scheduler, accelerator,
              total: int, data_report: dict | None = None) -> Start:
    """Step 4 of SFT, DPO and PPO: with --resume, continue from OUT/checkpoints/latest (`checkpoint.resume_from`
    refuses another run's settings), or say that a finished run has nothing left to do; record the run as running
    (run.json) and open its metrics from the step it continues at (what an interrupted run logged later goes); a
    fresh run logs `data_report` at step 0 (`open_run`)."""
    main = accelerator.is_main_process
    last = checkpoint.resume_from(out / "checkpoints", cfg) if cfg.resume else None
    state = fresh
    if last is not None:
        state = checkpoint.load(last, net, optimizer, scheduler, accelerator)
        if (done := checkpoint.finished_run(out, state["step"], total, main)) is not None:
            release_output(out)
            return Start(state, last, None, done)
        if main:
            print(f"resuming from {last} (step {state['step']})")
    return Start(state, last, open_run(out, cfg, command, state["step"] if last else None, data_report, main), None)


def open_run(out: Path, cfg: RunConfig, command: str, resumed_at: int | None, data_report: dict | None,
             main: bool) -> Tracker:
    """Record the run as running (run.json) and open its metrics: from step `resumed_at` when resumed (what an
    interrupted run logged later goes), else fresh, with `data_report` logged at step 0."""
    from rlhfkit.config import write_run_json

    if main:
        write_run_json(out, cfg, command, status="running")
    tracker = Tracker(out, enabled=main, resume_step=resumed_at)
    if resumed_at is None and data_report:
        tracker.log(0, data_report)
    return tracker
