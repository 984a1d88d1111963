"""Scores for sampled responses: a reward-model directory, a programmatic `--reward-fn module:function`, or both
summed. Used by `rlhfkit best-of-n` and `rlhfkit ppo`.

- Reward model: a directory written by `rlhfkit rm`, scored as `rlhfkit score` scores (prompt + response
  rendered by the RM's own chat template, pooled by transformers, `reward.score_sequences`), with the recorded
  normalisation (r − offset) × scale applied unless `normalize` is false. The n samples of a prompt share its
  prefix: it runs once (`score_shared_prefixes`, equal up to float rounding).
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

from rlhfkit import UsageError, models
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
    """(N,) float64 rewards from the function, checked: one finite number per response. An exception inside the
    function becomes one error naming it and the first row that raises it alone."""
    try:
        values = fn(prompts, responses, metadata)
    except Exception as e:  # noqa: BLE001 - the user's code: any exception is theirs to see, with where it arose
        row = next((i for i in range(len(responses)) if _raises(fn, prompts[i:i + 1], responses[i:i + 1],
                                                                metadata[i:i + 1])), None)
        where = f"on row {row} (response {responses[row][:60]!r})" if row is not None else \
            f"on a batch of {len(responses)} rows (no single row raises it)"
        raise UsageError(f"--reward-fn {spec}: raised {type(e).__name__}: {e} {where}") from None
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != len(responses):
        raise UsageError(f"--reward-fn {spec}: returned {len(values)} values for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)]
    if bad:
        raise UsageError(f"--reward-fn {spec}: value {bad[0]} is {values[bad[0]]!r}, not a finite number")
    return torch.tensor(values, dtype=torch.float64)


def _raises(fn: RewardFn, prompts: list[Messages], responses: list[str], metadata: list[dict[str, Any]]) -> bool:
    try:
        fn(prompts, responses, metadata)
    except Exception:  # noqa: BLE001
        return True
    return False


@dataclass
class RewardModel:
    """A reward model loaded from an `rlhfkit rm` directory, ready to score (prompt, response) text."""

    model: Any
    tokenizer: Any
    offset: float
    scale: float
    precision: str = "no"  # the autocast precision its blocks' weights are stored in (`models.inference_weights`)

    @classmethod
    def load(cls, path: str, device: torch.device, precision: str = "no") -> RewardModel:
        """The model of `path` on `device`, its blocks' weights stored for scoring under `precision` (every
        `score` call must then use that precision)."""
        from rlhfkit.algos.score import load_reward_model

        model, tok, offset, scale = load_reward_model(path, precision)
        return cls(model.to(device), tok, offset, scale, precision if precision in models.AUTOCAST_DTYPES else "no")

    def score(self, prompts: list[Messages], responses: list[str], batch_size: int, max_length: int,
              precision: str, normalize: bool = True) -> tuple[torch.Tensor, int]:
        """(N,) float64 scores, normalised unless told otherwise, and how many sequences were truncated."""
        from rlhfkit.algos.reward import encode, score_sequences

        if self.precision != "no" and precision != self.precision:
            raise ValueError(f"this reward model was loaded for {self.precision} scoring, not {precision}")
        seqs, truncated = [], 0
        for k, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, full = encode(self.tokenizer, prompt + [{"role": "assistant", "content": response}], max_length,
                               f"sample {k}")
            seqs.append(ids)
            truncated += full > len(ids)
        device = next(self.model.parameters()).device
        cast = functools.partial(autocast, device, precision)
        runs = prompt_runs(prompts)
        if (len(runs) < len(prompts) and min(map(len, seqs)) > 1 and hasattr(self.model, "score")
                and hasattr(self.model, "base_model")):
            raw = score_shared_prefixes(self.model, seqs, runs, self.tokenizer.pad_token_id, batch_size, cast)
        else:
            raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id, batch_size, cast)
        return ((raw - self.offset) * self.scale if normalize else raw), truncated


def prompt_runs(prompts: list[Messages]) -> list[range]:
    """Runs of consecutive equal prompts (best-of-n and PPO put a prompt's n samples next to each other)."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append(range(start, i))
            start = i
    return runs


# a group of prompts whose prefixes run together spans up to this many batches of rows, so that its suffixes,
# sorted by length, pad little (best-of-16's responses run from 3 to 48 tokens)
GROUP_BATCHES = 4


@torch.no_grad()
def score_shared_prefixes(model, seqs: list[list[int]], runs: list[range], pad_id: int, batch_size: int,
                          autocast) -> torch.Tensor:
    """`reward.score_sequences`' scores (up to float rounding; tested), reading each run's shared prefix once.

    The n samples of a prompt share the prompt's tokens, often most of the sequence: the shared prefix (the
    longest common one, less at least one token so every sequence keeps a suffix) is run once into a KV cache,
    the cache is copied to the run's rows, and only the suffixes run on top of it. Runs are taken in groups of
    up to GROUP_BATCHES × batch_size rows: the group's prefixes run once, then its suffixes in batches of
    batch_size rows of similar length. The score is read at each sequence's last token, as transformers'
    pooling does for right-padded input. seqs: token ids in input order; runs: ranges of `seqs` to share a
    prefix. Returns (len(seqs),) float64.
    """
    from rlhfkit.algos.reward import score_on_prefixes
    from rlhfkit.data.collate import pad_left, pad_right

    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs), dtype=torch.float64)
    shared = []  # (run, prefix length)
    for run in runs:
        n = models.shared_prefix_length([seqs[i] for i in run])
        if n == 0:  # nothing shared (equal prompts render to equal tokens, so not expected): one row per run
            shared += [(range(i, i + 1), len(seqs[i]) - 1) for i in run]
        else:
            shared.append((run, n))
    group: list[tuple[range, int]] = []
    for item in shared + [None]:
        if item is not None and (not group or sum(len(r) for r, _ in group) + len(item[0])
                                 <= GROUP_BATCHES * batch_size):
            group.append(item)
            continue
        # one forward for the group's prefixes (left-padded) into a KV cache ...
        prefix_ids, prefix_mask = pad_left([seqs[r[0]][:n] for r, n in group], pad_id)  # (G, P)
        prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        with autocast(), models.native_gqa(device):
            cache = models.prefix_cache(model.base_model, prefix_ids, prefix_mask)
        # ... then its rows' suffixes (right-padded), shortest first, batch_size rows per forward on the cache
        rows = sorted(((i, g, n) for g, (r, n) in enumerate(group) for i in r), key=lambda x: len(seqs[x[0]]) - x[2])
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            suffix_ids, suffix_mask = pad_right([seqs[i][n:] for i, _, n in chunk], pad_id)  # (R, S)
            row_of = torch.tensor([g for _, g, _ in chunk])  # (R,) prefix of each row
            with autocast(), models.native_gqa(device):
                scores = score_on_prefixes(model, prefix_ids, prefix_mask, row_of, suffix_ids, suffix_mask, cache)
            out[[i for i, _, _ in chunk]] = scores.double().cpu()
        if item is not None:
            group = [item]
    return out
