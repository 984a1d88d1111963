"""`rlhfkit best-of-n`: rejection sampling. n samples per prompt, scored; the best becomes SFT data, best vs worst
becomes DPO data.

Papers:
- Bai et al. 2022 (HH, "Training a helpful and harmless assistant with RLHF"): best-of-n (rejection) sampling
  against the preference model as the inference-time baseline for RLHF, and reward read against √KL.
- Touvron et al. 2023 (Llama 2) §3.2.3: rejection-sampling fine-tuning: K samples per prompt, the best by the reward
  model kept and fine-tuned on (expert iteration), iterated.
- Stiennon et al. 2020 ("Learning to summarize from human feedback"), App. G.3: KL(π_BoN ‖ π) = log n − (n−1)/n
  (`core.losses.best_of_n_kl`); Gao et al. 2022 plot best-of-n's gold reward against this KL.

One run, top to bottom:
  1. load the scorers first (a reward-model directory, a reward function, or both), so a typo fails before sampling
  2. sample n responses per prompt through exactly `rlhfkit generate`'s path (`rollout.sampling.sample`)
  3. score every sample: RM (normalised as `rlhfkit score` does), function, or their sum
  4. per prompt: best = highest score (the first on ties), worst = lowest
  5. write the best as SFT rows and best-vs-worst as DPO pairs (tied or identical pairs are skipped and counted),
     and optionally every scored sample
  6. report the mean score of sample 0 (what plain sampling gives) against the best, and the analytic KL

Departures, and why:
- The KL is the analytic value, not measured: exact when the n samples are distinct, an upper bound when they can
  repeat (at temperature 0 all n samples are the same and the true KL is 0).
- One round only: Llama 2 kept the best sample over all earlier rounds' policies; run the command again on the new
  SFT model for another round (expert iteration).
- Unfinished samples (cut at max_new_tokens) compete like the others; `finished` is recorded in every output row
  and `bon/best_finished_rate` is the share of winners that finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit import UsageError, models
from rlhfkit.rollout.sampling import SamplingConfig, generation_settings, sample, sample_rows
from rlhfkit.config import run_record_path, write_run_record
from rlhfkit.core.losses import best_of_n_kl
from rlhfkit.data import formats, io
from rlhfkit.reward_fn import RewardFn, call_reward_fn, load_reward_fn
from rlhfkit.reward_model import RewardModel
from rlhfkit.rollout import Samples
from rlhfkit.tracking import check_output


@dataclass
class BestOfNConfig(SamplingConfig):
    """rlhfkit best-of-n: rejection sampling; the best of n samples per prompt as SFT data, best vs worst as DPO
    pairs."""

    policy: str = "smollm2-135m"
    """Model to sample from: an alias, a Hugging Face directory (e.g. the SFT output), a .gguf file or a hub id."""
    reward_model: str | None = None
    """Reward-model directory from `rlhfkit rm`; scores are normalised as `rlhfkit score` does (see --normalize)."""
    reward_fn: str | None = None
    """Programmatic reward, module:function or path/file.py:function, called as fn(prompts, responses, metadata)
    -> floats (metadata: the prompt rows' columns); summed with the RM's score when both are given."""
    output: str = "best_of_n.jsonl"
    """SFT data: one {"messages": prompt + best response} row per prompt. The run record goes beside it (.run.json)."""
    pairs_output: str | None = None
    """DPO data: best-vs-worst {"prompt", "chosen", "rejected"} rows; default OUTPUT with suffix .pairs.jsonl."""
    samples_output: str | None = None
    """Also write every sample with its scores here (JSON Lines); not written when not given."""
    n: int = 16
    """Samples per prompt."""
    normalize: bool = True
    """Apply the reward model's recorded normalisation, (r − offset) × scale, as `rlhfkit score` does."""
    max_length: int = 1024
    """Longest prompt + response the reward model reads, in tokens; longer ones keep their start (counted)."""


def pairs_path(cfg: BestOfNConfig) -> Path:
    return Path(cfg.pairs_output) if cfg.pairs_output else Path(cfg.output).with_suffix(".pairs.jsonl")


def score_samples(cfg: BestOfNConfig, rm: RewardModel | None, fn: RewardFn | None, prompts: list[formats.Prompt],
                  columns: list[dict[str, Any]], samples: Samples) -> tuple[dict[str, torch.Tensor], int]:
    """Per-sample scores (N,) float64 by source ("rm", "fn") and their sum ("total"); RM truncation count."""
    msgs = [prompts[int(i)].messages for i in samples.prompt_index]
    parts, truncated = {}, 0
    if rm is not None:
        parts["rm"], truncated = rm.score(msgs, samples.texts, cfg.batch_size, cfg.max_length,
                                          models.mixed_precision(cfg.dtype), cfg.normalize,
                                          groups=samples.prompt_index.tolist())
    if fn is not None:
        metadata = [columns[int(i)] for i in samples.prompt_index]
        parts["fn"] = call_reward_fn(fn, cfg.reward_fn, msgs, samples.texts, metadata)
    parts["total"] = sum(parts.values())
    return parts, truncated


def scored_rows(prompts: list[formats.Prompt], samples: Samples, settings: dict[str, Any],
                parts: dict[str, torch.Tensor]) -> Iterator[dict]:
    """generate's row for every sample, plus its scores: score (the total), score_rm, score_fn."""
    names = {"total": "score", "rm": "score_rm", "fn": "score_fn"}
    for k, row in enumerate(sample_rows(prompts, samples, settings)):
        yield {**row, **{names[source]: float(values[k]) for source, values in parts.items()}}


def assistant(text: str) -> formats.Messages:
    return [{"role": "assistant", "content": text}]


def best_of_n(cfg: BestOfNConfig) -> dict[str, float]:
    # 1. outputs and scorers first: a wrong path or function name fails before any sampling
    if not cfg.reward_model and not cfg.reward_fn:
        raise UsageError("best-of-n needs --reward-model DIR, --reward-fn module:function, or both")
    check_output(cfg.output)
    check_output(pairs_path(cfg), "--pairs-output")
    if cfg.samples_output:
        check_output(cfg.samples_output, "--samples-output")
    fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    rm = RewardModel.load(cfg.reward_model, models.device(), models.mixed_precision(cfg.dtype)) if cfg.reward_model \
        else None

    # 2. sample: the same path as `rlhfkit generate`, so sample 0 of each prompt is what generate --n 1 gives
    prompts, columns, samples, metrics = sample(cfg, cfg.policy)

    # 3. score
    start = time.perf_counter()
    parts, truncated = score_samples(cfg, rm, fn, prompts, columns, samples)
    metrics["time/score"] = time.perf_counter() - start
    scores = parts["total"].view(len(prompts), cfg.n)  # (P, n), row i·n + j of Samples is [i, j]

    # 4. best and worst of each prompt (argmax/argmin return the first on ties)
    best, worst = scores.argmax(dim=1), scores.argmin(dim=1)  # (P,)
    texts = [samples.texts[k:k + cfg.n] for k in range(0, len(samples.texts), cfg.n)]
    finished = samples.finished.view(len(prompts), cfg.n)

    # 5. SFT rows, DPO pairs (skipping ties), every sample
    sft_rows, pair_rows, tied, identical = [], [], 0, 0
    for i, prompt in enumerate(prompts):
        b, w = int(best[i]), int(worst[i])
        sft_rows.append({"messages": prompt.messages + assistant(texts[i][b]), "score": float(scores[i, b]),
                         "finished": bool(finished[i, b]), "prompt_index": i, "sample_index": b})
        if scores[i, b] == scores[i, w]:
            tied += 1
        elif texts[i][b] == texts[i][w]:
            identical += 1  # the same text scored differently (batch numerics): no preference to learn
        else:
            pair_rows.append({"prompt": prompt.messages, "chosen": assistant(texts[i][b]),
                              "rejected": assistant(texts[i][w]), "chosen_score": float(scores[i, b]),
                              "rejected_score": float(scores[i, w]), "prompt_index": i})
    io.write_jsonl(cfg.output, sft_rows)
    io.write_jsonl(pairs_path(cfg), pair_rows)
    if cfg.samples_output:
        io.write_jsonl(cfg.samples_output, scored_rows(prompts, samples, generation_settings(cfg, cfg.policy), parts))

    # 6. report
    kl = best_of_n_kl(cfg.n)
    metrics.update({
        "bon/n": cfg.n, "bon/prompts": len(prompts),
        "bon/score_first": float(scores[:, 0].mean()), "bon/score_best": float(scores.max(dim=1).values.mean()),
        "bon/score_mean": float(scores.mean()), "bon/score_worst": float(scores.min(dim=1).values.mean()),
        "bon/kl": kl, "bon/sqrt_kl": kl ** 0.5, "bon/best_finished_rate": float(finished.gather(1, best[:, None])
                                                                               .double().mean()),
        "bon/pairs": len(pair_rows), "bon/pairs_skipped_tied": tied, "bon/pairs_skipped_identical": identical,
        "rm/truncated": truncated})
    print(summary(cfg, metrics))
    write_run_record(cfg.output, cfg, "best-of-n", metrics,
                     {"outputs": {"sft": cfg.output, "pairs": str(pairs_path(cfg)),
                                  "samples": cfg.samples_output, "run": str(run_record_path(cfg.output))}})
    return metrics


def summary(cfg: BestOfNConfig, m: dict[str, float]) -> str:
    n, gain = cfg.n, m["bon/score_best"] - m["bon/score_first"]
    skipped = m["bon/pairs_skipped_tied"] + m["bon/pairs_skipped_identical"]
    return "\n".join([
        f"best-of-{n} over {m['bon/prompts']} prompts: mean score {m['bon/score_first']:.4f} (sample 0) -> "
        f"{m['bon/score_best']:.4f} (best), {gain:+.4f}",
        f"KL(best-of-{n} ‖ policy) = log {n} − {n - 1}/{n} = {m['bon/kl']:.4f} nats (analytic; √KL "
        f"{m['bon/sqrt_kl']:.3f})",
        f"SFT rows: {m['bon/prompts']} -> {cfg.output}; DPO pairs: {m['bon/pairs']} -> {pairs_path(cfg)} "
        f"({skipped} skipped: {m['bon/pairs_skipped_tied']} tied best/worst score, "
        f"{m['bon/pairs_skipped_identical']} identical best/worst text)",
    ])
