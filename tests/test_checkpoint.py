"""Checkpoints: pruning keeps what this run wrote last, `latest` always names a checkpoint that exists, and
`--resume` never restarts from step 0 over an earlier run's files without a word."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhfkit import UsageError, checkpoint
from rlhfkit.algos.sft import SFTConfig


def save_steps(root, steps: list[int], keep: int = 2, config=None) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in steps:
        checkpoint.save(root, step, model, optimizer, scheduler, {"step": step}, accelerator, keep, config)


def test_a_run_writing_lower_steps_than_an_earlier_one_keeps_its_own(tmp_path):
    # steps 20 and 40 from an earlier run; this one writes 5 and 10: pruning by step number deleted each new
    # checkpoint right after writing it and left `latest` naming nothing
    root = tmp_path / "checkpoints"
    save_steps(root, [20, 40])
    save_steps(root, [5, 10])
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000005", "step-0000010"]
    assert checkpoint.latest(root) == root / "step-0000010"
    save_steps(root, [15], keep=1)
    assert [p.name for p in root.glob("step-*")] == ["step-0000015"]
    save_steps(root, [16, 17], keep=5)  # fewer than the limit: none goes
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000015", "step-0000016", "step-0000017"]


def test_resume_continues_starts_fresh_or_refuses(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.resume_from(out / "checkpoints") is None  # nothing there yet: a fresh start
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "model.safetensors").write_text("")
    with pytest.raises(UsageError, match=r"holds a run \(model.safetensors, run.json\) but no checkpoint"):
        checkpoint.resume_from(out / "checkpoints")  # a finished run without checkpoints: not wiped from step 0
    save_steps(out / "checkpoints", [3])
    assert checkpoint.resume_from(out / "checkpoints") == out / "checkpoints" / "step-0000003"
    (out / "checkpoints" / "latest").write_text("step-0000009")
    with pytest.raises(UsageError, match=r"names step-0000009, which is missing; point it at one of "
                                         r"\['step-0000003'\]"):
        checkpoint.resume_from(out / "checkpoints")


def test_resume_refuses_other_settings_and_takes_a_longer_run(tmp_path):
    cfg = SFTConfig(model="tiny-llama", output=str(tmp_path), lr=1e-3, max_steps=4)
    root = tmp_path / "checkpoints"
    save_steps(root, [2], config=cfg)
    # where the directory now is, how long it runs and how it logs and saves may change
    moved = replace(cfg, output=str(tmp_path / "moved"), resume=True, max_steps=8, save_steps=2)
    assert checkpoint.resume_from(root, moved) is not None
    # anything else is another run: a new --lr would be overridden by the restored schedule without a word
    with pytest.raises(UsageError, match=r"other settings \(--batch-size 8 → 4; --lr 0.001 → 0.01\); resume with"):
        checkpoint.resume_from(root, replace(cfg, resume=True, lr=1e-2, batch_size=4))
