"""Checkpoints: pruning keeps what this run wrote last, `latest` always names a checkpoint that exists, and
`--resume` never restarts from step 0 over an earlier run's files without a word."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


def on_small_disk(tmp_path, megabytes: int, script: str) -> subprocess.CompletedProcess:
    """Run the shell `script` with DISK (tmp_path/disk) a tmpfs of `megabytes`: a real full disk, in a private mount
    namespace (`unshare`, no root needed). What the script leaves on DISK is copied to tmp_path/after."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    after.mkdir()
    mount = f"mount -t tmpfs -o size={megabytes}m tmpfs {disk} || exit 99"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"{mount}\n{script}\nrc=$?\ncp -a {disk}/. {after}/\nexit $rc"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DISK": str(disk),
                                                                             "NO_COLOR": "1"})
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()[-200:]}")
    return proc


def test_a_full_disk_while_writing_is_one_message_and_leaves_nothing_half_written(tmp_path):
    # torch.save reports ENOSPC as "unexpected pos 576 vs 534"; the estimate (1 MB) passes the check before writing
    script = (f"{sys.executable} -c \"import os, sys, torch; from pathlib import Path; from rlhfkit import checkpoint\n"
              "tmp = Path(os.environ['DISK']) / 'step.tmp'; tmp.mkdir()\n"
              "with checkpoint.writing(tmp, 'a checkpoint (step 3)', need=2**20, keep=2):\n"
              "    torch.save(torch.zeros(2**20), tmp / 'optimizer.pt')\"")  # 4 MB on a 2 MB disk
    proc = on_small_disk(tmp_path, 2, script)
    assert proc.returncode == 1
    assert "TrainingError: disk full: a checkpoint (step 3) needs about 1 MB and" in proc.stderr, proc.stderr
    assert not list((tmp_path / "after").iterdir())  # the partial step.tmp is gone


SFT = ("-m", "rlhfkit.cli", "sft", "--model", "tiny-llama", "--data", "sample:conversations", "--batch-size", "2")


def test_a_full_disk_stops_training_with_how_much_is_needed_and_keeps_the_last_checkpoint(tmp_path):
    # tiny-llama is 24 MB and a checkpoint (weights and two AdamW moments) 73 MB: step 2's fits, step 4's does not
    proc = on_small_disk(tmp_path, 100, " ".join([sys.executable, *SFT, "--max-steps", "4", "--save-steps", "2",
                                                  "--output", "$DISK/run"]))
    assert proc.returncode == 1
    last = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert re.fullmatch(r"error: disk full: a checkpoint \(step 4\) needs about 73 MB and \S+/run/checkpoints has "
                        r"2\d MB free; a run with --save-total-limit 2 needs about 3 × that for its checkpoints \(the "
                        r"next one is written before the oldest goes\), plus the final model\. Free some space \(or "
                        r"lower --save-total-limit\), then rerun with --resume\.", last), last
    ckpts = tmp_path / "after" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]
    assert (ckpts / "latest").read_text() == "step-0000002"


def test_a_full_disk_at_the_final_save_leaves_no_model_without_weights(tmp_path):
    proc = on_small_disk(tmp_path, 20, " ".join([sys.executable, *SFT, "--max-steps", "1", "--output", "$DISK/run"]))
    assert proc.returncode == 1
    assert re.search(r"\nerror: disk full: the final model needs about 24 MB and \S+/run has 20 MB free\. Free some "
                     r"space, then rerun with --resume: it saves the model from the last checkpoint", proc.stderr), \
        proc.stderr[-500:]
    left = sorted(p.name for p in (tmp_path / "after" / "run").iterdir())
    assert left == [".rlhfkit.lock", "metrics.jsonl", "run.json", "tensorboard"]  # no config.json alone, no .saving
    record = json.loads((tmp_path / "after" / "run" / "run.json").read_text())
    assert record["status"] == "running" and record["config"]["max_steps"] == 1  # what the unfinished run was
