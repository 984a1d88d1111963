"""Checkpoints that survive a SIGKILL: written under a temporary name, renamed, then `latest` is switched.

A checkpoint holds the trainable weights, optimizer and scheduler states, every process's RNG states and the
trainer state (step, data position, counters), so `--resume` reaches bit-for-bit the result of an
uninterrupted run on CPU. Shared by every trainer (SFT, RM, DPO, PPO).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (the full model, a LoRA adapter, the unfrozen layers)."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, accelerator,
         keep: int = 2) -> Path:
    """Write `root/step-N` atomically and point `root/latest` at it; keep the newest `keep` checkpoints."""
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore a checkpoint into already-prepared objects; returns the trainer state."""
    weights = load_file(path / "trainable.safetensors")
    missing = accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / f"rng_{accelerator.process_index}.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
