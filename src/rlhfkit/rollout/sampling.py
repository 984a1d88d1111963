"""Sampling from a model named on the command line: the fields every sampling command shares, its prompts, the
rollout engine, and one JSON row per sample. `rlhfkit generate`, best-of-n's step 2 and the pipeline use it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhfkit import models
from rlhfkit.data import formats
from rlhfkit.rollout import EngineConfig, Samples, SamplingParams, make_engine


@dataclass
class SamplingConfig(EngineConfig):
    """Fields that every sampling command shares (generate, best-of-n)."""

    prompts: str = "sample:prompts"
    """Prompts: {"prompt": ...} or {"messages": [...]} ending with a user turn, or any format with a prompt
    (pairs, rankings, hh, alpaca); or sample:NAME."""
    format: str | None = None
    """Prompt file format; detected from the columns when not given."""
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to rlhfkit's, FILE=OURS (`--columns rating=scores answers=responses`), for a layout
    whose columns are named otherwise; keys inside `completions` objects too."""
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


def sampling_params(cfg: SamplingConfig) -> SamplingParams:
    return SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)


def load_prompts(path: str, fmt: str | None, columns: list[str] | None = None
                 ) -> tuple[list[formats.Prompt], list[dict[str, Any]]]:
    """The prompts of a file and each prompt row's own columns (passed on to reward functions as metadata)."""
    prompts, rows = formats.read(path, formats.to_prompt, fmt, columns=columns)
    return prompts, [r.data for r in rows]


def sample(cfg: SamplingConfig, model_name: str) -> tuple[list[formats.Prompt], list[dict[str, Any]], Samples,
                                                          dict[str, float]]:
    """Steps 1–3: prompts, prompt-row columns, n samples per prompt, and rollout metrics."""
    # 1. prompts (a malformed row is an error naming file and line)
    prompts, columns = load_prompts(cfg.prompts, cfg.format, cfg.columns)
    params = sampling_params(cfg)
    # 2. model and tokenizer
    tok = models.load_tokenizer(model_name)
    model = models.load_causal_lm(model_name, seed=0, tokenizer=tok).to(models.device())
    # 3. sample
    engine = make_engine(cfg, model, tok, cfg.batch_size, models.mixed_precision(cfg.dtype), progress=True,
                         seed=cfg.seed)
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
