"""`rlhfkit generate`: n sampled responses per prompt, through the rollout engine that best-of-n and PPO share.

One run, top to bottom:
  1. read the prompts (any format with a prompt: prompts, conversations ending with a user turn, pairs, ...)
  2. load the model and its tokenizer (chat template) onto the GPU if there is one
  3. sample with `rollout.hf.HFEngine`: chat template with generation prompt, left-padded batches, KV cache,
     temperature / top-p, stop at EOS or end-of-turn, row (i, j) seeded by (seed, i, j)
  4. write one JSON line per sample, with the generation settings, and OUTPUT.run.json beside it

`sample` (steps 1–3) is also best-of-n's first step, so best-of-n with n=1 is this command with the same seed.

Outputs and departures from the other commands (docs/algorithms/sampling.md):
- The output is a file, not a directory, so the run record is written beside it as OUTPUT with the suffix
  `.run.json` (samples.jsonl -> samples.run.json): runs that write into one folder, or into a model directory
  that has its own run.json, never overwrite each other's. There is no training loop, so no metrics.jsonl or
  TensorBoard events: the final metrics are in the run record and printed.
- tiny-llama's random weights are always drawn from seed 0 (`rlhfkit sft`'s default), so `--seed` changes the
  samples, never the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


from rlhfkit import models
from rlhfkit.config import write_run_record
from rlhfkit.data import formats, io
from rlhfkit.rollout import Samples, SamplingParams
from rlhfkit.rollout.hf import HFEngine
from rlhfkit.tracking import check_output


@dataclass
class SamplingConfig:
    """Fields that every sampling command shares (generate, best-of-n)."""

    prompts: str = "sample:prompts"
    """Prompts: {"prompt": ...} or {"messages": [...]} ending with a user turn, or any format with a prompt
    (pairs, rankings, hh, alpaca); or sample:NAME."""
    format: str | None = None
    """Prompt file format; detected from the columns when not given."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of most likely tokens whose probability reaches top_p
    (1: off)."""
    max_new_tokens: int = 256
    """Longest response in tokens; a response cut here is marked finished=false."""
    seed: int = 0
    """Sampling seed: sample j of prompt i is drawn from its own random stream seeded by (seed, i, j), so it does
    not depend on batch size or n."""
    batch_size: int = 16
    """Sequences per forward pass."""
    dtype: str = "auto"
    """Compute precision: auto (bf16 autocast where the hardware has it), bf16, fp16 or fp32."""


@dataclass
class GenerateConfig(SamplingConfig):
    """rlhfkit generate: sample n responses per prompt (batched, seeded) into a JSON Lines file."""

    model: str = "smollm2-135m"
    """Model to sample from: an alias (smollm2-135m, tiny-llama), a Hugging Face directory, a .gguf file or a hub id."""
    output: str = "samples.jsonl"
    """Output JSON Lines file, one row per sample; the run record goes beside it as OUTPUT with suffix .run.json."""


def sampling_params(cfg: SamplingConfig) -> SamplingParams:
    return SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)


def load_prompts(path: str, fmt: str | None) -> tuple[list[formats.Prompt], list[dict[str, Any]]]:
    """The prompts of a file and each prompt row's own columns (passed on to reward functions as metadata)."""
    rows = io.read_rows(path)
    fmt = formats.detect_format(rows, fmt)
    return [formats.to_prompt(r, fmt) for r in rows], [r.data for r in rows]


def sample(cfg: SamplingConfig, model_name: str) -> tuple[list[formats.Prompt], list[dict[str, Any]], Samples,
                                                          dict[str, float]]:
    """Steps 1–3: prompts, prompt-row columns, n samples per prompt, and rollout metrics."""
    # 1. prompts (a malformed row is an error naming file and line)
    prompts, columns = load_prompts(cfg.prompts, cfg.format)
    params = sampling_params(cfg)
    # 2. model and tokenizer
    tok = models.load_tokenizer(model_name)
    model = models.load_causal_lm(model_name, seed=0, tokenizer=tok).to(models.device())
    # 3. sample
    engine = HFEngine(model, tok, cfg.batch_size, models.mixed_precision(cfg.dtype), progress=True)
    start = time.perf_counter()
    samples = engine.generate([p.messages for p in prompts], params)
    elapsed = time.perf_counter() - start
    lengths = samples.response_lengths.double()
    metrics = {"rollout/samples": len(samples.texts), "rollout/prompts": len(prompts),
               "rollout/length": float(lengths.mean()),
               "rollout/finished_rate": float(samples.finished.double().mean()),
               "time/generate": elapsed, "perf/tokens_per_s": float(lengths.sum()) / elapsed}
    return prompts, columns, samples, metrics


def generation_settings(cfg: SamplingConfig, model_name: str) -> dict[str, Any]:
    return {"model": model_name, "n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def sample_rows(prompts: list[formats.Prompt], samples: Samples, settings: dict[str, Any]) -> Iterator[dict]:
    """One JSON-ready row per sample, in prompt-major order."""
    lengths = samples.response_lengths.tolist()
    for k, text in enumerate(samples.texts):
        i, j = int(samples.prompt_index[k]), int(samples.sample_index[k])
        yield {"prompt": prompts[i].messages, "response": text, "finished": bool(samples.finished[k]),
               "prompt_index": i, "sample_index": j, "response_tokens": lengths[k], "generation": settings}




def generate(cfg: GenerateConfig) -> dict[str, float]:
    check_output(cfg.output)
    prompts, _, samples, metrics = sample(cfg, cfg.model)
    # 4. one row per sample, and the run record
    io.write_jsonl(cfg.output, sample_rows(prompts, samples, generation_settings(cfg, cfg.model)))
    write_run_record(cfg.output, cfg, "generate", metrics)
    return metrics
