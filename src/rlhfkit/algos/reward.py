"""Reward model (RM): learn human rankings as a scalar score; `rlhfkit rm` trains it, `rlhfkit score` applies it.

Papers: Ouyang et al. 2022 (InstructGPT) §3.5 and Eq. 1: a causal LM with its unembedding replaced by a scalar
head; K ranked responses per prompt give C(K,2) comparisons, and all comparisons of one prompt are one batch
element, so each response is scored once and every prompt weighs the same:
    loss(θ) = −E_x [ 1/C(K,2) · Σ_{(w,l)} log σ(r_θ(x, y_w) − r_θ(x, y_l)) ].
Bai et al. 2022 (HH, "Training a helpful and harmless assistant") §4: preference-model pre-training (PMP) on a
large, weaker comparison set before fine-tuning on the human comparisons, and calibration checked as
σ(r_A − r_B) against the observed frequency (rlhfkit/evaluate/calibration.py). Normalisation before RL as in
InstructGPT and Ziegler et al. 2019.

Each optimizer step, top to bottom (the same skeleton as sft.py; the code's step comments number them
5.1–5.5, after the set-up steps 1–4):
  5.1. take this step's global batch of prompts (a seeded permutation per epoch of the current phase)
  5.2. this process's micro-batches: score every response once, sum of per-prompt losses / prompts in the global
       batch, backward
  5.3. stop (or skip, with --skip-nonfinite) on a non-finite loss or gradient
  5.4. clip, optimizer and scheduler step
  5.5. log, evaluate, checkpoint
After the last step: normalise (offset, optional scale), evaluate with calibration, save.

Departures, and why (details in docs/algorithms/reward.md):
- The score is read at the last token of the chat template's rendering of prompt + response (for ChatML the
  newline after `<|im_end|>`), exactly where plain `AutoModelForSequenceClassification` pools it; the RM gets a
  pad token the template never writes, so padding can never be mistaken for the pooled token.
- Llama-family score heads have no bias and transformers drops one on load, so the normalisation offset and
  scale are stored in config.json (`rlhfkit_reward_offset`, `rlhfkit_reward_scale`) and applied by
  `rlhfkit score` (`--normalize false` gives the raw score, which equals plain transformers').
- A row's margin m enters as −log σ(r_w − r_l − m) (Llama 2's margin loss), applied to every pair of the row.
- PMP uses the same loss as fine-tuning (HH binarised its PMP data; any comparison file works here), with a
  fresh optimizer and schedule for each phase.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhfkit import ModelError, TrainingError, UsageError, checkpoint, distributed, forward, models
from rlhfkit.config import write_run_json
from rlhfkit.core.losses import grouped_ranking_loss, pairwise_loss
from rlhfkit.data import chat, formats
from rlhfkit.evaluate import calibration
from rlhfkit.reward_model import can_share_prefix, encode, score_sequences, set_reward_pad_token
from rlhfkit.tracking import release_output
from rlhfkit.training import (TrainConfig, adamw, add_sums, begin, for_training, global_batch_rows, make_schedule,
                              micro_batches, open_run, plan_steps, reduce_sums, split_validation, update, zero_sums)


@dataclass
class RMConfig(TrainConfig):
    """rlhfkit rm: a reward model from comparisons (pairs, K-way rankings, HH transcripts)."""

    RETOLD: ClassVar[dict[str, str]] = {
        "format": "Data format; detected from the columns when not given (pairs, rankings, scored, hh, ...: "
                  "docs/data.md).",
        "val_data": "Held-out comparisons; when not given, a seeded `val_fraction` of the prompts is held out.",
        "val_fraction": "Fraction of the prompts held out for evaluation when `val_data` is not given (0 disables).",
        "max_length": "Longest prompt + response in tokens; longer ones keep their start and lose their end "
                      "(counted).",
        "epochs": "Passes over the data (InstructGPT: one; more overfits).",
        "max_steps": "Optimizer steps of the main phase; overrides `epochs` when > 0.",
        "batch_size": "Prompts per micro-batch on each process (each with all of its K responses).",
        "grad_accum": "Micro-batches per optimizer step; global batch = batch_size × grad_accum × processes prompts.",
        "warmup_ratio": "Fraction of each phase's steps spent warming up linearly from 0.",
        "lora": "Train a LoRA adapter (and the score head) instead of all weights.",
        "merge": "With --lora, also save the merged model under OUTPUT/merged (what `rlhfkit score` loads).",
        "seed": "Seed for data order, the validation split and the initialisation of new weights (the score head).",
        "eval_steps": "Evaluate on the held-out comparisons every N steps (0: only at the end).",
    }

    model: str = "smollm2-135m"
    """Backbone: alias (smollm2-135m, tiny-llama), Hugging Face directory (e.g. the SFT output), .gguf or hub id."""
    data: str = "sample:rankings"
    """Comparisons (pairs, rankings, scored responses or hh; .jsonl/.json/.parquet/.csv/save_to_disk dir, or
    sample:NAME)."""
    output: str = "runs/rm"
    """Output directory: reward model, checkpoints, metrics.jsonl, TensorBoard events, reliability.png, run.json."""
    pmp_data: str | None = None
    """Preference-model pre-training (HH §4): a large, weaker comparison set trained on first."""
    pmp_lr: float = 1e-5
    """Peak learning rate of the PMP phase."""
    pmp_epochs: int = 1
    """Passes over `pmp_data`."""
    norm_data: str | None = None
    """Reference set for normalisation (SFT demonstrations); default: the best response of each training prompt."""
    norm_samples: int = 1000
    """At most this many reference responses are scored for normalisation (a seeded sample)."""
    normalize: bool = True
    """After training, record an offset so that the mean score on the reference set is 0 (InstructGPT)."""
    normalize_std: bool = False
    """Also record a scale so that the standard deviation on the reference set is 1."""
    fit_temperature: bool = False
    """Fit a temperature on the held-out comparisons and report the ECE after it (recorded, not applied)."""
    calibration_bins: int = 10
    """Equal-width bins on [0.5, 1] for the ECE and the reliability diagram."""
    lr: float = 1e-5
    """Peak learning rate (AdamW) of the main phase."""
    min_score_gap: float = 0.0
    """Scored responses: drop a pair whose scores differ by less than this (a near-tie; counted). Equal scores
    never make a pair."""
    tiny_hidden_size: int = 64
    """Hidden size of the random tiny-llama backbone (tests; ignored for real models)."""
    shared_prefix: bool = True
    """Run the common start of a prompt's K responses (the prompt) once per step and the responses on its KV
    cache, instead of K whole sequences; the same scores and gradients up to float rounding (tested). Used on
    one process without LoRA or gradient checkpointing; elsewhere every sequence runs whole."""


# --- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPreference:
    """One prompt's K responses as token ids (prompt + response, each ending where the template ends).

    input_ids: K lists of token ids; pairs: (winner, loser) indices into them; response_lengths: K response
    token counts (before truncation), for the length-bias buckets.
    """

    input_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    margin: float | None
    response_lengths: list[int]
    where: str


@dataclass
class DataReport:
    """What reading and tokenising did to a comparison set; printed and logged so nothing is dropped silently."""

    examples: int = 0
    truncated: int = 0
    identical_pairs: int = 0  # chosen and rejected are the same response: the pair is skipped
    below_score_gap: int = 0  # pairs of scored responses closer than --min-score-gap: dropped
    skipped_no_pairs: int = 0  # nothing left to compare (all identical, all tied or all near-ties)

    def as_dict(self, prefix: str = "data") -> dict[str, int]:
        return {f"{prefix}/{k}": v for k, v in vars(self).items()}


def encode_preferences(tok, prefs: list[formats.Preference], max_length: int
                       ) -> tuple[list[EncodedPreference], DataReport]:
    report = DataReport()
    out = []
    for pref in prefs:
        report.below_score_gap += pref.below_score_gap
        pairs = [(w, l) for w, l in pref.pairs if pref.responses[w] != pref.responses[l]]
        report.identical_pairs += len(pref.pairs) - len(pairs)
        if not pairs:
            report.skipped_no_pairs += 1
            continue
        prompt_len = len(chat.encode_prompt(tok, pref.prompt))
        ids, lengths = [], []
        for response in pref.responses:
            seq, full = encode(tok, pref.prompt + response, max_length, pref.where)
            report.truncated += full > len(seq)
            ids.append(seq)
            lengths.append(full - prompt_len)
        out.append(EncodedPreference(ids, pairs, pref.margin, lengths, pref.where))
    report.examples = len(out)
    return out, report


@dataclass(frozen=True)
class RewardBatch:
    """All responses of a batch of prompts, flat. N = total responses.

    sequences: the N responses (each with its prompt) as one `forward.Batch`, padded with the RM's pad id (which
               no text contains); with a shared prefix, each prompt's common start runs once
    groups:    one list per prompt of (winner, loser) indices into the N responses
    margins:   one margin (or None) per prompt
    """

    sequences: forward.Batch
    groups: list[list[tuple[int, int]]]
    margins: list[float | None]


def collate_preferences(items: list[EncodedPreference], pad_id: int, share_prefix: bool = False) -> RewardBatch:
    """One batch; with `share_prefix`, each prompt's common start runs once (`forward.rows`)."""
    seqs, groups, prompt_of, offset = [], [], [], 0
    for k, item in enumerate(items):
        seqs += [forward.Row(ids, [0] * len(ids)) for ids in item.input_ids]
        prompt_of += [k] * len(item.input_ids)
        groups.append([(offset + w, offset + l) for w, l in item.pairs])
        offset += len(item.input_ids)
    batch = forward.rows(seqs, pad_id, prompt_of if share_prefix else None)
    return RewardBatch(batch, groups, [item.margin for item in items])


# --- model ------------------------------------------------------------------------------------------------


def build_model(cfg: RMConfig, tok):
    """A sequence-classification model (num_labels=1) on the backbone; new weights are seeded by `cfg.seed`."""
    from transformers import AutoModelForSequenceClassification

    src = models.resolve(cfg.model)
    with torch.random.fork_rng(devices=[]):  # the new score head is drawn from the seed, not the global RNG
        torch.manual_seed(cfg.seed)
        if src.path is None:
            config = models.tiny_llama_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id,
                                              hidden_size=cfg.tiny_hidden_size,
                                              intermediate_size=2 * cfg.tiny_hidden_size)
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(src.path, num_labels=1,
                                                                           dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot load {cfg.model!r} as a reward model: {e}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    return for_training(model, cfg, "SEQ_CLS")



def use_shared_prefix(cfg: RMConfig, model) -> bool:
    """Whether this run scores on shared prefixes (checkpointed layers drop the KV cache it needs; a sharded model
    runs whole rows, `distributed.whole_rows`)."""
    return cfg.shared_prefix and not cfg.gradient_checkpointing and can_share_prefix(model) \
        and not distributed.whole_rows(model, cfg.sharding)



def preference_loss_sum(scores: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
    """Σ over prompts of each prompt's mean pair loss (InstructGPT Eq. 1); margins as −log σ(Δ − m)."""
    plain = [g for g, m in zip(batch.groups, batch.margins) if m is None]
    total = grouped_ranking_loss(scores, plain) * len(plain)
    for g, m in zip(batch.groups, batch.margins):
        if m is not None:
            w, l = zip(*g)
            total = total + pairwise_loss(scores[list(w)], scores[list(l)], margin=m)
    return total


# --- evaluation and normalisation ----------------------------------------------------------------------------


@torch.no_grad()
def pair_differences(model, items: list[EncodedPreference], cfg: RMConfig, pad_id: int, autocast
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """r_w − r_l [P] for every pair of `items`, and the (winner, loser) response lengths [P, 2]."""
    was_training = model.training
    model.eval()
    diffs, lengths = [], []
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        batch = collate_preferences(chunk, pad_id, use_shared_prefix(cfg, model))
        with autocast():
            s = forward.scores(model, batch.sequences).cpu()
        flat_lengths = [n for item in chunk for n in item.response_lengths]
        for g in batch.groups:
            diffs += [s[w] - s[l] for w, l in g]
            lengths += [(flat_lengths[w], flat_lengths[l]) for w, l in g]
    model.train(was_training)
    return torch.stack(diffs).double(), torch.tensor(lengths)


LENGTH_BUCKETS = (64, 128, 256, 512)  # upper edges (tokens) of the mean response length of a pair


def evaluate(diffs: torch.Tensor, lengths: torch.Tensor, cfg: RMConfig) -> dict[str, float]:
    """Accuracy (ties count half), mean margin, length-bias splits, ECE, optional temperature."""
    correct = (diffs > 0).double() + 0.5 * (diffs == 0).double()
    m = {"rm/accuracy": float(correct.mean()), "rm/margin": float(diffs.mean()),
         "rm/val_loss": float(F.softplus(-diffs).mean()), "rm/pairs": len(diffs)}
    w, l = lengths[:, 0], lengths[:, 1]
    for name, sel in (("chosen_longer", w > l), ("chosen_shorter", w < l)):
        if sel.any():
            m[f"rm/accuracy_{name}"] = float(correct[sel].mean())
    mean_len, lo = lengths.double().mean(dim=1), 0
    for hi in (*LENGTH_BUCKETS, math.inf):
        sel = (mean_len >= lo) & (mean_len < hi)
        if sel.any():
            m[f"rm/accuracy_len_{lo}-{'' if hi == math.inf else hi - 1}"] = float(correct[sel].mean())
        lo = hi
    p, outcome = calibration.oriented(diffs)
    m["rm/ece"] = calibration.ece(p, outcome, cfg.calibration_bins)
    if cfg.fit_temperature:
        t = calibration.fit_temperature(diffs)
        m["rm/temperature"] = t
        m["rm/ece_temperature_scaled"] = calibration.ece(*calibration.oriented(diffs / t), cfg.calibration_bins)
    return m


def reference_messages(cfg: RMConfig, train_prefs: list[formats.Preference]) -> list[formats.Messages]:
    """The normalisation reference: SFT demonstrations when given, else the best response of each prompt."""
    if cfg.norm_data:
        convs = [c.messages for c in formats.read(cfg.norm_data, formats.to_conversation)[0]]
        if not all(convs):
            raise UsageError(f"--norm-data {cfg.norm_data}: plain text has no responses to score; give "
                             "conversations or prompt/completion rows")
    else:
        convs = [p.prompt + p.responses[p.pairs[0][0]] for p in train_prefs if p.pairs]
    keep = torch.randperm(len(convs), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.norm_samples]
    return [convs[i] for i in sorted(keep.tolist())]



# --- training ---------------------------------------------------------------------------------------------


class StepSums(NamedTuple):
    """One step's sums over its prompts and processes (scalar tensors)."""

    loss: torch.Tensor  # Σ per-prompt losses
    correct: torch.Tensor  # comparisons the RM orders right
    pairs: torch.Tensor  # comparisons
    tokens: torch.Tensor  # tokens scored


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own data, peak learning rate, optimizer and schedule (PMP, then main)."""

    name: str
    rows: list[EncodedPreference]
    lr: float
    start: int  # global step at which the phase begins
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def load_data(cfg: RMConfig, tok, main: bool):
    """Step 2: the encoded training, held-out and PMP comparisons, the training preferences (for the normalisation
    reference), what loading did (logged at step 0) and the same for run.json, with the invalid rows named."""
    skipped = formats.Skipped() if cfg.skip_invalid else None
    convert = functools.partial(formats.to_preference, min_score_gap=cfg.min_score_gap)
    prefs = formats.read(cfg.data, convert, cfg.format, skipped, cfg.columns)[0]
    if cfg.val_data:
        train_prefs, val_prefs = prefs, formats.read(cfg.val_data, convert, None, skipped, cfg.columns)[0]
    else:
        train_prefs, val_prefs = split_validation(prefs, cfg.val_fraction, cfg.seed)
    train_rows, report = encode_preferences(tok, train_prefs, cfg.max_length)
    val_rows, val_report = encode_preferences(tok, val_prefs, cfg.max_length)
    pmp_prefs = formats.read(cfg.pmp_data, convert, None, skipped, cfg.columns)[0] if cfg.pmp_data else []
    pmp_rows, pmp_report = encode_preferences(tok, pmp_prefs, cfg.max_length)
    if not train_rows:
        raise TrainingError(f"no comparisons left in {cfg.data}: {report.identical_pairs} identical pairs, "
                            f"{report.below_score_gap} pairs closer than --min-score-gap, "
                            f"{report.skipped_no_pairs} rows without any pair")
    logged = {**report.as_dict(), **val_report.as_dict("data_val"), **pmp_report.as_dict("data_pmp")}
    recorded = dict(logged)
    if skipped:
        logged["data/skipped_invalid"] = skipped.count
        recorded.update(skipped.as_dict())
    if main:
        for what, r in (("train", report), ("validation", val_report), ("pmp", pmp_report)):
            if r.truncated or r.identical_pairs or r.skipped_no_pairs or r.below_score_gap:
                print(f"data ({what}): {r.truncated} responses truncated to {cfg.max_length} tokens, "
                      f"{r.identical_pairs} identical chosen/rejected pairs skipped, "
                      f"{r.below_score_gap} pairs closer than --min-score-gap dropped, "
                      f"{r.skipped_no_pairs} rows left without a pair")
        if skipped and skipped.count:
            print(skipped.line())
    return train_prefs, train_rows, val_rows, pmp_rows, logged, recorded


def train(cfg: RMConfig) -> dict:
    # 1. setup: processes, precision, seed, tokenizer with a pad token the template never writes, model
    accelerator, out = begin(cfg)
    main, world = accelerator.is_main_process, accelerator.num_processes
    tok = models.load_tokenizer(cfg.model)
    set_reward_pad_token(tok)
    model = build_model(cfg, tok)
    model.train()

    # 2. data: render prompt + response, truncate (counted), drop identical pairs (counted), hold out prompts
    train_prefs, train_rows, val_rows, pmp_rows, data_report, data_record = load_data(cfg, tok, main)
    main_steps = plan_steps(cfg, len(train_rows), world).total_steps
    pmp_steps = cfg.pmp_epochs * plan_steps(cfg, len(pmp_rows), world).steps_per_epoch if pmp_rows else 0
    phases = [Phase("pmp", pmp_rows, cfg.pmp_lr, 0, pmp_steps),
              Phase("main", train_rows, cfg.lr, pmp_steps, main_steps)]
    total_steps = pmp_steps + main_steps
    if pmp_steps and world > 1 and cfg.sharding.startswith("zero"):  # a second engine on one module
        raise UsageError(f"--pmp-data with --sharding {cfg.sharding} is not supported (each phase has its own "
                         "optimizer, and a DeepSpeed engine takes one): pre-train in a run of its own, or use fsdp2")
    net = distributed.prepare_model(model, cfg.sharding, accelerator)
    params = [p for p in net.parameters() if p.requires_grad]

    # 3. resume: the checkpoint's step says which phase's optimizer state it holds
    state = {"step": 0, "tokens": 0, "nonfinite_skipped": 0}
    ckpt_root = out / "checkpoints"
    last = checkpoint.resume_from(ckpt_root, cfg) if cfg.resume else None
    resume_step = json.loads((last / "trainer_state.json").read_text())["step"] if last else 0
    if last is not None and (done := checkpoint.finished_run(out, resume_step, total_steps, main)) is not None:
        release_output(out)
        return done
    tracker = open_run(out, cfg, "rm", resume_step if last else None, data_report, main)

    # 4. the phases (PMP, then main): a fresh optimizer and schedule each; steps 5.1–5.5 are in run_phase
    bar = tqdm(total=total_steps, initial=resume_step, disable=not main, desc="rm", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    for p, phase in enumerate(phases):
        if phase.steps == 0 or phase.end < resume_step:
            continue
        optimizer = adamw(params, cfg, lr=phase.lr)
        scheduler = make_schedule(optimizer, cfg, phase.steps)
        trained, optimizer = distributed.prepare_optimizer(net, optimizer, cfg, accelerator)
        if last is not None and phase.start < resume_step <= phase.end:
            state = checkpoint.load(last, trained, optimizer, scheduler, accelerator)
            if main:
                print(f"resuming from {last} (step {state['step']}, phase {phase.name})")
        metrics = run_phase(cfg, p, phase, trained, params, optimizer, scheduler, state, accelerator, tracker, bar,
                            val_rows, tok.pad_token_id, total_steps) or metrics
    bar.close()

    # 6. normalise on the reference set, evaluate on the held-out comparisons (with calibration), save
    unwrapped = distributed.unwrap(net)
    final = {**metrics, "train/steps": state["step"], "train/nonfinite_skipped": state["nonfinite_skipped"]}
    offset, scale = 0.0, 1.0
    if cfg.normalize:
        ref = [encode(tok, m, cfg.max_length, "normalisation reference")[0]
               for m in reference_messages(cfg, train_prefs)]
        ref_scores = score_sequences(unwrapped, ref, tok.pad_token_id, cfg.batch_size, accelerator.autocast)
        offset = float(ref_scores.mean())
        scale = 1.0 / max(float(ref_scores.std(unbiased=False)), 1e-6) if cfg.normalize_std else 1.0
        final.update({"rm/norm_offset": offset, "rm/norm_scale": scale, "rm/norm_samples": len(ref)})
    if val_rows:
        diffs, lengths = pair_differences(unwrapped, val_rows, cfg, tok.pad_token_id, accelerator.autocast)
        final.update(evaluate(diffs, lengths, cfg))
    weights = distributed.full_state_dict(unwrapped)  # gathered by every process (None: not sharded)
    if main:
        tracker.log(state["step"], {k: v for k, v in final.items() if k.startswith("rm/")})
        save_model(unwrapped, tok, out, cfg, offset, scale, final.get("rm/temperature"), weights)
        write_run_json(out, cfg, "rm", final, {**distributed.report(trained, params, optimizer, accelerator),
                                               "data": data_record})
        if val_rows:  # drawn once the model is safe
            bins = calibration.reliability_bins(*calibration.oriented(diffs), cfg.calibration_bins)
            calibration.plot_reliability(bins, out / "reliability.png")
    tracker.close()
    release_output(out)
    accelerator.wait_for_everyone()
    return final


def run_phase(cfg, p, phase, net, params, optimizer, scheduler, state, accelerator, tracker, bar, val_rows,
              pad_id, total_steps) -> dict:
    """Steps 5.1–5.5 for every remaining step of one phase; returns the last logged metrics."""
    world = accelerator.num_processes
    global_batch, steps_per_epoch, _ = plan_steps(cfg, len(phase.rows), world)
    metrics, t_last, tokens_since = {}, time.perf_counter(), 0
    share = use_shared_prefix(cfg, net) and not cfg.compile  # compiled blocks run eagerly on a KV cache
    # a prompt's K responses pad to the longest of the batch
    lengths = [max(map(len, r.input_ids)) for r in phase.rows] if cfg.group_by_length else None
    while state["step"] < phase.end:
        step = state["step"]
        # 5.1 this step's prompts; this process takes every world-th prompt, in grad_accum micro-batches
        rows = [phase.rows[i] for i in global_batch_rows(step - phase.start, len(phase.rows), global_batch,
                                                         cfg.seed + 1000 * p, lengths)]
        micro = micro_batches(rows, accelerator, cfg.batch_size)
        weight = world / len(rows)
        # 5.2 score each response once; Σ per-prompt losses / prompts in the global batch (× world: DDP averages)
        sums = zero_sums(StepSums, accelerator.device)
        for j, (mb, real) in enumerate(micro):
            batch = collate_preferences(mb, pad_id, share)
            with distributed.gradient_sync([net], j == len(micro) - 1):
                with accelerator.autocast():  # net's own forward has it; the shared-prefix path does not call it
                    scores = forward.scores(net, batch.sequences)  # (N,)
                loss_sum = preference_loss_sum(scores, batch)
                distributed.backward(loss_sum * weight * real, net, accelerator)
            diffs = torch.stack([scores[w] - scores[l] for g in batch.groups for w, l in g]).detach()
            new = StepSums(loss_sum.detach(), (diffs > 0).sum().float(), torch.tensor(float(len(diffs))),
                           torch.tensor(float(batch.sequences.num_tokens)))
            sums = add_sums(sums, StepSums._make(v.to(accelerator.device) for v in new), keep=real)
        sums = reduce_sums(sums, accelerator)
        step_tokens = int(sums.tokens.item())
        loss = sums.loss.item() / len(rows)
        # 5.3–5.4 clip, guard against non-finite values and stalls, update
        done = update(loss, net, params, optimizer, scheduler, state, cfg, accelerator, bar, cfg_root(cfg),
                      rows[0].where)
        if done is None:
            continue
        lr, grad_norm = done
        state["tokens"] += step_tokens
        tokens_since += step_tokens
        step = state["step"]
        bar.set_postfix(loss=f"{loss:.4f}", phase=phase.name)
        # 5.5 log, evaluate, checkpoint
        if step % cfg.log_steps == 0 or step == phase.end:
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/accuracy": (sums.correct / sums.pairs).item(), "train/lr": lr,
                       "train/grad_norm": grad_norm, "train/phase": p,
                       "train/epoch": (step - phase.start) / steps_per_epoch,
                       "train/tokens": state["tokens"], "perf/tokens_per_s": tokens_since / (now - t_last)}
            tracker.log(step, metrics)
            t_last, tokens_since = now, 0
        if val_rows and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            diffs, lengths = pair_differences(distributed.unwrap(net), val_rows, cfg, pad_id,
                                              accelerator.autocast)
            tracker.log(step, evaluate(diffs, lengths, cfg))
        if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps):
            checkpoint.save(cfg_root(cfg), step, net, optimizer, scheduler, state, accelerator,
                            cfg.save_total_limit, cfg)
    return metrics


def cfg_root(cfg: RMConfig) -> Path:
    return Path(cfg.output) / "checkpoints"


def save_model(model, tok, out: Path, cfg: RMConfig, offset: float, scale: float, temperature: float | None,
               weights: dict | None = None) -> None:
    """A sequence-classification directory; normalisation (and temperature) ride along in config.json. `weights`:
    a sharded model's, gathered."""
    base = model.get_base_model() if cfg.lora else model
    base.config.update({"rlhfkit_reward_offset": offset, "rlhfkit_reward_scale": scale,
                        "rlhfkit_reward_temperature": temperature})
    models.save_pretrained(model, tok, out, merge=cfg.lora and cfg.merge, state_dict=weights)  # --lora: adapter, head
