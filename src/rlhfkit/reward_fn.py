"""Programmatic rewards: `--reward-fn module:function` (importable: on PYTHONPATH, since the `rlhfkit` script does
not search the current directory) or `path/to/file.py:function`, called once with all rows as `fn(prompts,
responses, metadata)`: prompts are message lists, responses strings, metadata the prompt rows' own columns (one
dict per response, e.g. with a reference answer). It returns one finite number per response. Used by `rlhfkit
best-of-n` and `rlhfkit ppo`, alone or summed with a reward model's scores (rlhfkit/reward_model.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit import UsageError
from rlhfkit.data.formats import Messages

RewardFn = Callable[[list[Messages], list[str], list[dict[str, Any]]], Sequence[float]]


def load_reward_fn(spec: str, option: str = "--reward-fn") -> RewardFn:
    """`module:function` or `path/to/file.py:function` -> the function; errors name `option`."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UsageError(f"{option} {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UsageError(f"{option} {spec!r}: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{option} {spec!r}: cannot import {module_name!r} ({e}); put it on PYTHONPATH or "
                         "name the file: path/to/file.py:function") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"{option} {spec!r}: {module_name!r} has no function {fn_name!r}")
    return fn


def call_reward_fn(fn: RewardFn, spec: str, prompts: list[Messages], responses: list[str],
                   metadata: list[dict[str, Any]], option: str = "--reward-fn") -> torch.Tensor:
    """(N,) float64 rewards from the function, checked: one finite number per response. An exception inside the
    function becomes one error naming it (`option spec`) and the first row that raises it alone."""
    try:
        values = fn(prompts, responses, metadata)
    except Exception as e:  # noqa: BLE001 - the user's code: any exception is theirs to see, with where it arose
        row = next((i for i in range(len(responses)) if _raises(fn, prompts[i:i + 1], responses[i:i + 1],
                                                                metadata[i:i + 1])), None)
        where = f"on row {row} (response {responses[row][:60]!r})" if row is not None else \
            f"on a batch of {len(responses)} rows (no single row raises it)"
        raise UsageError(f"{option} {spec}: raised {type(e).__name__}: {e} {where}") from None
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != len(responses):
        raise UsageError(f"{option} {spec}: returned {len(values)} values for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)]
    if bad:
        raise UsageError(f"{option} {spec}: value {bad[0]} is {values[bad[0]]!r}, not a finite number")
    return torch.tensor(values, dtype=torch.float64)


def _raises(fn: RewardFn, prompts: list[Messages], responses: list[str], metadata: list[dict[str, Any]]) -> bool:
    try:
        fn(prompts, responses, metadata)
    except Exception:  # noqa: BLE001
        return True
    return False
