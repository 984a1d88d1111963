"""Fixtures of the PPO tests (in-process and --backend ray)."""

from __future__ import annotations

import pytest

from rlhfkit.algos import sft

from tests.conftest import torch_threads


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory) -> str:
    """PPO starts from an SFT model, as in the recipe: 40 SFT steps concentrate the random tiny model on
    common words, so a reward over its samples has something to select from. Made once, read by every PPO test."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("sft")
    # on two threads, as in one pytest process on the 2-core machines the PPO tests' thresholds were set on: a
    # pytest -n worker computes on one, which rounds otherwise and trains another model
    with torch_threads(2):
        sft.train(sft.SFTConfig(model="tiny-llama", output=str(out), max_steps=40, batch_size=8, lr=1e-2,
                                schedule="constant", warmup_ratio=0.0, dtype="fp32", val_fraction=0.0, max_length=256))
    AcceleratorState._reset_state(reset_partial_state=True)
    return str(out)
