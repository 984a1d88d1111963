"""Direct preference optimisation (DPO) and its family: learn from comparisons without a reward model or RL.

Papers: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(sigmoid loss −log σ(β·h)); Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (IPO: (h − 1/(2β))²); Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO,
label smoothing ε). h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)] on sequence
log-probs summed over response tokens (`rlhfkit.losses.dpo_loss`).

Each optimizer step of `train`'s loop, top to bottom (the code's step comments number them 5.1–5.5, after
the set-up steps 1–4):
  5.1. take this step's global batch of pairs (a seeded permutation per epoch)
  5.2. this process's micro-batches: chosen and rejected in one concatenated forward, summed response log-probs,
       reference log-probs (cached, or a frozen copy, or the LoRA base with the adapter off), loss, backward
  5.3. stop (or skip, with --skip-nonfinite) on a non-finite loss or gradient
  5.4. clip, optimizer and scheduler step
  5.5. log, evaluate, checkpoint

The reference, three ways (`--ref-mode`):
- `precomputed` (default without LoRA): reference log-probs of every pair computed once before training and
  cached beside the run (ref_logps.pt, keyed by model, data and length); training then holds one model.
- `copy`: a frozen copy of the reference model, evaluated on every batch.
- `lora` (default with --lora): the policy's own base with the adapter disabled; no second copy.

Departures, and why:
- Dropout is off in the policy too (the model runs in eval mode while it trains): the paper and TRL disable it,
  since dropout noise in log π but not in log π_ref biases h.
- IPO uses summed log-probs, as in the paper; TRL length-normalises (ALGORITHMS.md).
- A K-way ranking contributes all of its C(K,2) pairs as separate examples (ties give none), or with
  --ranking-pairs best_worst only its best response against its worst (neighbours in a noisy ranking are often
  near-ties: on the built-in task the pipeline's DPO learns from best_worst and not from all pairs, RESULTS.md).
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from tqdm.auto import tqdm

from rlhfkit import TrainingError, UsageError, checkpoint, distributed, forward, models
from rlhfkit.config import write_run_json
from rlhfkit.core.losses import DPO_LOSSES, best_worst_pair, dpo_loss
from rlhfkit.data import chat, formats
from rlhfkit.data.chat import TokenizedExample
from rlhfkit.tracking import release_output
from rlhfkit.training import (TrainConfig, adamw, add_sums, begin, for_training, global_batch_rows, make_schedule,
                              means, micro_batches, plan_steps, reduce_sums, split_validation, start_run, update,
                              zero_sums)


@dataclass
class DPOConfig(TrainConfig):
    """rlhfkit dpo: direct preference optimisation (sigmoid, IPO, conservative DPO) on comparisons."""

    RETOLD: ClassVar[dict[str, str]] = {"epochs": "Passes over the pairs."}

    model: str = "smollm2-135m"
    """Policy to train, usually the SFT model: an alias, a Hugging Face directory, a .gguf file or a hub id."""
    data: str = "sample:pairs"
    """Comparisons: pairs, K-way rankings (all C(K,2) pairs), scored responses or HH transcripts (docs/data.md);
    or sample:NAME."""
    output: str = "runs/dpo"
    """Output directory: final model, checkpoints, ref_logps.pt, metrics.jsonl, TensorBoard events, run.json."""
    ref_model: str | None = None
    """Reference model π_ref; default: the initial policy (`model`)."""
    ref_mode: str = "auto"
    """Reference log-probs: precomputed (once, cached), copy (a frozen second model), lora (base with the adapter
    off; needs --lora) or auto (lora with --lora, else precomputed)."""
    loss: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    beta: float = 0.1
    """β: strength of the implicit KL penalty to the reference."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability ε that a label is flipped (sigmoid loss only)."""
    min_score_gap: float = 0.0
    """Scored responses: drop a pair whose scores differ by less than this (a near-tie; counted). Equal scores
    never make a pair."""
    ranking_pairs: str = "all"
    """The pairs a K-way ranking (or K scored responses) gives: all (its C(K,2) pairs) or best_worst (only the best
    response against the worst: the pair its labeller is surest of, where neighbours in a noisy ranking are often
    near-ties)."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    batch_size: int = 4
    """Pairs per micro-batch on each process (2× as many sequences in the concatenated forward)."""
    shared_prefix: bool = True
    """Run the prompt a pair's chosen and rejected responses share once, and both responses on its KV cache,
    instead of two whole sequences: the same log-probs up to float rounding (tested), on fewer tokens. Not while
    training with gradient checkpointing (checkpointed layers keep no KV cache); reference passes still use it."""


# --- data ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairExample:
    """One comparison as two token sequences whose loss mask covers the response only."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int  # position in its split, the key of the precomputed reference log-probs
    where: str


@dataclass
class PairReport:
    pairs: int = 0
    identical_pairs: int = 0  # chosen == rejected: nothing to learn, skipped
    below_score_gap: int = 0  # pairs of scored responses closer than --min-score-gap: dropped
    skipped_no_pairs: int = 0  # rows whose responses are all tied (or near-ties): no pair
    skipped_invalid: int = 0  # rows that could not be converted, skipped with --skip-invalid
    truncated: int = 0  # sequences cut to max_length
    skipped_no_response: int = 0  # a response cut away entirely: skipped

    def as_dict(self) -> dict[str, int]:
        return {f"data/{k}": v for k, v in vars(self).items()}


def load_pairs(path: str, fmt: str | None, tok, max_length: int, min_score_gap: float = 0.0,
               skipped: formats.Skipped | None = None, columns: list[str] | None = None, which: str = "all"
               ) -> tuple[list[PairExample], PairReport]:
    """Every comparison of a file as tokenised pairs (`which`: all of a row's pairs, or best_worst); with
    `skipped`, rows that cannot be converted are left out and counted there (and in the report)."""
    report, out = PairReport(), []
    before = skipped.count if skipped else 0
    convert = functools.partial(formats.to_preference, min_score_gap=min_score_gap)
    for pref in formats.read(path, convert, fmt, skipped, columns)[0]:
        report.below_score_gap += pref.below_score_gap
        report.skipped_no_pairs += not pref.pairs
        for w, l in (pref.pairs if which == "all" else best_worst_pair(pref.pairs)):
            if pref.responses[w] == pref.responses[l]:
                report.identical_pairs += 1
                continue
            c = chat.tokenize_response(tok, pref.prompt, pref.responses[w], pref.where, max_length)
            r = chat.tokenize_response(tok, pref.prompt, pref.responses[l], pref.where, max_length)
            report.truncated += c.truncated + r.truncated
            if not any(c.loss_mask) or not any(r.loss_mask):
                report.skipped_no_response += 1
                continue
            out.append(PairExample(c, r, len(out), pref.where))
    report.pairs = len(out)
    report.skipped_invalid = skipped.count - before if skipped else 0
    return out, report


def reindex(pairs: list[PairExample]) -> list[PairExample]:
    return [PairExample(p.chosen, p.rejected, i, p.where) for i, p in enumerate(pairs)]


def load_data(cfg: DPOConfig, tok, main: bool) -> tuple[list[PairExample], list[PairExample], PairReport,
                                                         PairReport | None, formats.Skipped | None]:
    """Step 2: training and held-out pairs, and what loading did to them (printed on the main process when it
    dropped or cut anything); the held-out report is None when they were split off the training data; the rows
    skipped as invalid (with --skip-invalid)."""
    skipped = formats.Skipped() if cfg.skip_invalid else None
    pairs, report = load_pairs(cfg.data, cfg.format, tok, cfg.max_length, cfg.min_score_gap, skipped,
                               cfg.columns, cfg.ranking_pairs)
    if cfg.val_data:
        val_pairs, val_report = load_pairs(cfg.val_data, None, tok, cfg.max_length, cfg.min_score_gap, skipped,
                                           cfg.columns, cfg.ranking_pairs)
    else:
        pairs, val_pairs = split_validation(pairs, cfg.val_fraction, cfg.seed)
        val_report = None
    pairs, val_pairs = reindex(pairs), reindex(val_pairs)
    if not pairs:
        raise TrainingError(f"no usable pairs in {cfg.data} ({report.as_dict()})")
    if main and (report.identical_pairs or report.truncated or report.skipped_no_response or report.below_score_gap
                 or report.skipped_no_pairs):
        print(f"data: {report.identical_pairs} identical pairs skipped, {report.truncated} sequences truncated "
              f"to {cfg.max_length} tokens, {report.skipped_no_response} pairs skipped (response cut away), "
              f"{report.below_score_gap} pairs closer than --min-score-gap dropped, {report.skipped_no_pairs} rows "
              "without a pair (all tied)")
    if main and skipped and skipped.count:
        print(skipped.line())
    return pairs, val_pairs, report, val_report, skipped


# --- log-probs ----------------------------------------------------------------------------------------------


def concatenated_logps(net, pairs: list[PairExample], pad_id: int, device, share_prefix: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, in one forward over (2B, T). -> (B,), (B,).

    With `share_prefix`, the tokens a pair's two sequences start with (the prompt, up to the position whose logit
    predicts the first trained token) run once, and the two continuations on their KV cache (`forward.rows`):
    the same log-probs up to float rounding (tested), on fewer tokens.
    """
    pair_of = list(range(len(pairs))) * 2  # chosen rows, then rejected rows
    batch = forward.rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id,
                         pair_of if share_prefix else None)
    logps = forward.sequence_logps(net, batch.to(device))  # (2B,)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def compute_reference(ref_net, pairs: list[PairExample], pad_id: int, batch_size: int, autocast, device,
                      desc: str = "", share_prefix: bool = False) -> torch.Tensor:
    """Reference log-probs of every pair, (n_pairs, 2): chosen, rejected."""
    out = torch.zeros(len(pairs), 2)
    for i in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not desc, dynamic_ncols=True):
        chunk = pairs[i:i + batch_size]
        with autocast():
            c, r = concatenated_logps(ref_net, chunk, pad_id, device, share_prefix)
        out[i:i + len(chunk)] = torch.stack([c, r], dim=1).cpu()
    return out


def cache_key(cfg: DPOConfig, ref_name: str, splits: dict[str, list[PairExample]]) -> str:
    h = hashlib.sha1(f"{ref_name}|{cfg.max_length}|{models.mixed_precision(cfg.dtype)}".encode())
    for name, pairs in splits.items():
        h.update(name.encode())
        for p in pairs:
            seqs = (p.chosen.input_ids, p.chosen.loss_mask, p.rejected.input_ids, p.rejected.loss_mask)
            h.update(str(seqs).encode())
    return h.hexdigest()


def precomputed_reference(cfg: DPOConfig, tok, splits: dict[str, list[PairExample]], accelerator
                          ) -> dict[str, torch.Tensor]:
    """Reference log-probs of the given pairs of every split, computed once by the main process and cached in
    OUTPUT; each split's table has a row per pair index (the pairs left out, never visited, stay NaN)."""
    path = Path(cfg.output) / "ref_logps.pt"
    ref_name = cfg.ref_model or cfg.model
    key = cache_key(cfg, ref_name, splits)
    if accelerator.is_main_process:
        cached = torch.load(path, weights_only=True) if path.is_file() else None
        if cached is None or cached.get("key") != key:
            ref = models.load_causal_lm(ref_name, seed=cfg.seed, tokenizer=tok).to(accelerator.device).eval()
            models.inference_weights(ref, models.mixed_precision(cfg.dtype))
            net = forward.SelectedLogits(ref)
            cached = {"key": key}
            for name, pairs in splits.items():
                table = torch.full((max((p.index for p in pairs), default=-1) + 1, 2), float("nan"))
                table[[p.index for p in pairs]] = compute_reference(
                    net, pairs, tok.pad_token_id, cfg.batch_size, accelerator.autocast, accelerator.device,
                    desc=f"reference log-probs ({name})", share_prefix=cfg.shared_prefix)
                cached[name] = table
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save(cached, tmp)
            tmp.replace(path)
            del ref, net
    accelerator.wait_for_everyone()
    cached = torch.load(path, weights_only=True)
    return {name: cached[name] for name in splits}


def reference_fn(mode: str, cfg: DPOConfig, tok, net, splits, accelerator):
    """A function (split, pairs) -> (ref_chosen (B,), ref_rejected (B,)) for the chosen reference mode."""
    device = accelerator.device
    if mode == "precomputed":
        table = precomputed_reference(cfg, tok, splits, accelerator)

        def lookup(split, pairs):
            rows = table[split][[p.index for p in pairs]].to(device)
            return rows[:, 0], rows[:, 1]
        return lookup
    if mode == "copy":
        ref = forward.SelectedLogits(models.load_causal_lm(cfg.ref_model or cfg.model, seed=cfg.seed, tokenizer=tok))
        models.inference_weights(ref.lm, models.mixed_precision(cfg.dtype))
        ref = ref.to(device).eval().requires_grad_(False)

        def frozen(split, pairs):
            with torch.no_grad(), accelerator.autocast():
                return concatenated_logps(ref, pairs, tok.pad_token_id, device, cfg.shared_prefix)
        return frozen
    if mode == "lora":
        if not cfg.lora:
            raise TrainingError("--ref-mode lora needs --lora (the reference is the base with the adapter off)")
        if cfg.ref_model:
            raise TrainingError("--ref-mode lora uses the policy's own base; drop --ref-model or use another mode")

        def adapter_off(split, pairs):
            policy = distributed.unwrap(net)  # SelectedLogits around the peft model
            with torch.no_grad(), accelerator.autocast(), policy.lm.disable_adapter():
                return concatenated_logps(policy, pairs, tok.pad_token_id, device, cfg.shared_prefix)
        return adapter_off
    raise TrainingError(f"--ref-mode {mode!r}: expected auto, precomputed, copy or lora")


# --- loss and evaluation ------------------------------------------------------------------------------------


class PairLosses(NamedTuple):
    """Per-pair results of one micro-batch; every tensor (B,). `loss` keeps its graph, the log-probs do not."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor


class PairSums(NamedTuple):
    """What a DPO step or evaluation logs, summed over its pairs (scalar tensors); `training.means` divides them
    by the pair count."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor

    @classmethod
    def of(cls, r: PairLosses) -> PairSums:
        c, j = r.chosen_reward, r.rejected_reward
        return cls(r.loss.detach().sum(), (c > j).float().sum(), (c - j).sum(), c.sum(), j.sum(),
                   r.logps_chosen.sum(), r.logps_rejected.sum())


def pair_losses(net, pairs, split, reference, cfg: DPOConfig, pad_id: int, device) -> PairLosses:
    """Per-pair DPO losses, implicit rewards and log-probs of one micro-batch. A sharded policy runs whole rows
    (`distributed.whole_rows`)."""
    share = cfg.shared_prefix and not ((cfg.gradient_checkpointing or cfg.compile) and torch.is_grad_enabled()) \
        and not distributed.whole_rows(net, cfg.sharding)
    chosen, rejected = concatenated_logps(net, pairs, pad_id, device, share)
    ref_chosen, ref_rejected = reference(split, pairs)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                                                        loss_type=cfg.loss, label_smoothing=cfg.label_smoothing)
    return PairLosses(losses, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())


@torch.no_grad()
def evaluate(net, pairs, reference, cfg: DPOConfig, pad_id: int, accelerator) -> dict[str, float]:
    """Held-out loss, preference accuracy and margin over all processes (on the unwrapped module)."""
    model = distributed.unwrap(net)
    sums = zero_sums(PairSums, accelerator.device)
    for mb, real in micro_batches(pairs, accelerator, cfg.batch_size):
        with accelerator.autocast():
            sums = add_sums(sums, PairSums.of(pair_losses(model, mb, "val", reference, cfg, pad_id,
                                                          accelerator.device)), keep=real)
    val = means(reduce_sums(sums, accelerator), len(pairs), "val")
    return {k: v for k, v in val.items() if not k.startswith("val/logps_")}


# --- training -----------------------------------------------------------------------------------------------


def train(cfg: DPOConfig) -> dict:
    if cfg.loss not in DPO_LOSSES:
        raise TrainingError(f"--loss {cfg.loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if cfg.ranking_pairs not in ("all", "best_worst"):
        raise UsageError(f"--ranking-pairs {cfg.ranking_pairs!r}: expected all or best_worst")
    # 1. setup: processes, precision, seed, policy (dropout off: eval mode while training)
    accelerator, out = begin(cfg)
    main, world = accelerator.is_main_process, accelerator.num_processes
    tok = models.load_tokenizer(cfg.model)
    model = for_training(models.load_causal_lm(cfg.model, seed=cfg.seed, tokenizer=tok), cfg)
    model.eval()

    # 2. data: every comparison as (chosen, rejected) with response-only masks; hold out pairs
    pairs, val_pairs, report, val_report, skipped = load_data(cfg, tok, main)
    global_batch, steps_per_epoch, total_steps = plan_steps(cfg, len(pairs), world)

    # 3. the policy spread over the processes (--sharding), optimizer, schedule, reference
    net = distributed.prepare_model(forward.SelectedLogits(model), cfg.sharding, accelerator)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    scheduler = make_schedule(optimizer, cfg, total_steps)
    net, optimizer = distributed.prepare_optimizer(net, optimizer, cfg, accelerator)
    mode = cfg.ref_mode if cfg.ref_mode != "auto" else ("lora" if cfg.lora else "precomputed")
    # only the training pairs that the steps will visit need reference log-probs (a --max-steps run over a large
    # ranking set visits a fraction of its C(K, 2) pairs)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs] if cfg.group_by_length \
        else None
    visited = sorted({i for step in range(total_steps) for i in global_batch_rows(step, len(pairs), global_batch,
                                                                                  cfg.seed, lengths)})
    reference = reference_fn(mode, cfg, tok, net, {"train": [pairs[i] for i in visited], "val": val_pairs},
                             accelerator)

    # 4. resume
    ckpt_root = out / "checkpoints"
    start = start_run(out, cfg, "dpo", {"step": 0, "tokens": 0, "nonfinite_skipped": 0}, net, optimizer, scheduler,
                      accelerator, total_steps, {**report.as_dict(), "data/val_pairs": len(val_pairs)})
    if start.finished is not None:
        return start.finished
    state, tracker = start.state, start.tracker

    # 5. the loop
    bar = tqdm(total=total_steps, initial=state["step"], disable=not main, desc="dpo", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    t_last, tokens_since = time.perf_counter(), 0
    while state["step"] < total_steps:
        step = state["step"]
        # 5.1 this step's pairs; this process takes every world-th pair, in grad_accum micro-batches
        rows = [pairs[i] for i in global_batch_rows(step, len(pairs), global_batch, cfg.seed, lengths)]
        step_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in rows)
        micro = micro_batches(rows, accelerator, cfg.batch_size)
        weight = world / len(rows)
        # 5.2 loss = mean over the pairs of the global batch (× world: DDP averages gradients)
        sums = zero_sums(PairSums, accelerator.device)
        for j, (mb, real) in enumerate(micro):
            with distributed.gradient_sync([net], j == len(micro) - 1):
                res = pair_losses(net, mb, "train", reference, cfg, tok.pad_token_id, accelerator.device)
                distributed.backward(res.loss.sum() * weight * real, net, accelerator)
            sums = add_sums(sums, PairSums.of(res), keep=real)
        step_metrics = means(reduce_sums(sums, accelerator), len(rows), "dpo")
        loss = step_metrics["dpo/loss"]
        # 5.3–5.4 clip, guard against non-finite values and stalls, update
        done = update(loss, net, params, optimizer, scheduler, state, cfg, accelerator, bar, ckpt_root, rows[0].where)
        if done is None:
            continue
        lr, grad_norm = done
        state["tokens"] += step_tokens
        tokens_since += step_tokens
        step = state["step"]
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{step_metrics['dpo/accuracy']:.2f}")
        # 5.5 log, evaluate, checkpoint
        if step % cfg.log_steps == 0 or step == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, **step_metrics, "train/lr": lr,
                       "train/grad_norm": grad_norm, "train/epoch": step / steps_per_epoch,
                       "train/tokens": state["tokens"], "perf/tokens_per_s": tokens_since / (now - t_last)}
            tracker.log(step, metrics)
            t_last, tokens_since = now, 0
        if val_pairs and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
            val = evaluate(net, val_pairs, reference, cfg, tok.pad_token_id, accelerator)
            metrics.update(val)
            tracker.log(step, val)
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps):
            checkpoint.save(ckpt_root, step, net, optimizer, scheduler, state, accelerator, cfg.save_total_limit,
                            cfg)
    bar.close()

    # 6. save a Hugging Face directory that plain transformers loads
    final = {**metrics, "train/steps": state["step"], "train/nonfinite_skipped": state["nonfinite_skipped"],
             "dpo/ref_mode": mode}
    weights = distributed.full_state_dict(net, strip="lm.")  # gathered by every process (None: not sharded)
    if main:
        models.save_pretrained(distributed.unwrap(net).lm, tok, out, merge=cfg.lora and cfg.merge,
                               state_dict=weights)
        data = {**report.as_dict(), "data/val_pairs": len(val_pairs),
                **({f"val_{k}": v for k, v in val_report.as_dict().items()} if val_report else {}),
                **(skipped.as_dict() if skipped else {})}
        write_run_json(out, cfg, "dpo", final, {**distributed.report(net, params, optimizer, accelerator),
                                                "data": data})
    tracker.close()
    release_output(out)
    accelerator.wait_for_everyone()
    return final
