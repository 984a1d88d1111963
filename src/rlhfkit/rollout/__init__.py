"""Rollouts: sampling responses to chat prompts behind one small engine interface.

`rlhfkit generate`, `rlhfkit best-of-n` and PPO all sample through an `Engine`:

    samples = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=128, seed=0))

`HFEngine` (rollout/hf.py) runs a Hugging Face causal LM with a KV cache (rollout/llama.py: its own forward passes
for Llama-family models); a vLLM engine can plug in behind the same interface later. Engines return token ids (so
PPO can recompute log-probabilities with a forward pass that has the training numerics; no engine returns
log-probabilities) and decoded text.

Seeding (docs/algorithms/sampling.md): row (i, j), sample j of prompt i of one `generate` call, draws all of its
randomness from its own stream seeded with (seed, i, j) (`row_rng`). A sample therefore does not depend on the
batch size, on which rows share its batch, on how many samples are drawn per prompt, or on any global RNG: sample 0
of best-of-n with any n is exactly the sample that n=1 gives with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rlhfkit import UsageError
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

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) long: sampled tokens per row, the stop token included."""
        return self.response_mask.sum(-1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response side by side, for a forward pass over both: input_ids, attention_mask (N, P + R)."""
        return (torch.cat([self.prompt_ids, self.response_ids], dim=1),
                torch.cat([self.prompt_mask, self.response_mask], dim=1))


class Engine(Protocol):
    """What generate, best-of-n and PPO need from a generation backend."""

    def generate(self, prompts: list[Messages], params: SamplingParams) -> Samples:
        """n samples of each prompt (a message list ending with a user turn), rendered by the chat template."""
        ...


def row_rng(seed: int, prompt_index: int, sample_index: int) -> np.random.Generator:
    """The random stream of one row: numpy's SeedSequence mixes (seed, i, j) into independent streams."""
    return np.random.default_rng([seed, prompt_index, sample_index])


def distinct_prompts(prompts: list[list[int]], device) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct token lists among `prompts` (U), in order of first appearance, and row_of (N,) on `device`:
    prompt r is distinct[row_of[r]]. A prompt sampled n times is prefilled once and its cache copied n times."""
    index: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts], device=device)
    return [list(p) for p in index], row_of
