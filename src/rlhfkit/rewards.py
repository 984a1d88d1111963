"""Scores for sampled responses: a reward-model directory, a programmatic `--reward-fn module:function`, or both
summed. Used by `rlhfkit best-of-n` and `rlhfkit ppo`.

- Reward model: a directory written by `rlhfkit rm`, scored exactly as `rlhfkit score` scores (prompt + response
  rendered by the RM's own chat template, pooled by transformers, `reward.score_sequences`), with the recorded
  normalisation (r − offset) × scale applied unless `normalize` is false.
- Reward function: `module:function` (importable: on PYTHONPATH, since the `rlhfkit` script does not search the
  current directory) or `path/to/file.py:function`, called once with all rows as `fn(prompts, responses,
  metadata)`: prompts are message lists, responses strings, metadata the prompt rows' own columns (one dict per
  response, e.g. with a reference answer). It returns one finite number per response.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit import UsageError
from rlhfkit.data.formats import Messages
from rlhfkit.rollout.hf import autocast

RewardFn = Callable[[list[Messages], list[str], list[dict[str, Any]]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """`module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UsageError(f"--reward-fn {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UsageError(f"--reward-fn {spec!r}: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--reward-fn {spec!r}: cannot import {module_name!r} ({e}); put it on PYTHONPATH or "
                         "name the file: path/to/file.py:function") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--reward-fn {spec!r}: {module_name!r} has no function {fn_name!r}")
    return fn


def call_reward_fn(fn: RewardFn, spec: str, prompts: list[Messages], responses: list[str],
                   metadata: list[dict[str, Any]]) -> torch.Tensor:
    """(N,) float64 rewards from the function, checked: one finite number per response."""
    values = fn(prompts, responses, metadata)
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != len(responses):
        raise UsageError(f"--reward-fn {spec}: returned {len(values)} values for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)]
    if bad:
        raise UsageError(f"--reward-fn {spec}: value {bad[0]} is {values[bad[0]]!r}, not a finite number")
    return torch.tensor(values, dtype=torch.float64)


@dataclass
class RewardModel:
    """A reward model loaded from an `rlhfkit rm` directory, ready to score (prompt, response) text."""

    model: Any
    tokenizer: Any
    offset: float
    scale: float

    @classmethod
    def load(cls, path: str, device: torch.device) -> RewardModel:
        from rlhfkit.algos.score import load_reward_model

        model, tok, offset, scale = load_reward_model(path)
        return cls(model.to(device), tok, offset, scale)

    def score(self, prompts: list[Messages], responses: list[str], batch_size: int, max_length: int,
              precision: str, normalize: bool = True) -> tuple[torch.Tensor, int]:
        """(N,) float64 scores, normalised unless told otherwise, and how many sequences were truncated."""
        from rlhfkit.algos.reward import encode, score_sequences

        seqs, truncated = [], 0
        for k, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, full = encode(self.tokenizer, prompt + [{"role": "assistant", "content": response}], max_length,
                               f"sample {k}")
            seqs.append(ids)
            truncated += full > len(ids)
        device = next(self.model.parameters()).device
        raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id, batch_size,
                              functools.partial(autocast, device, precision))
        return ((raw - self.offset) * self.scale if normalize else raw), truncated
