"""Checkpoints that survive a SIGKILL: written under a temporary name, renamed, then `latest` is switched.

A checkpoint holds the trainable weights, optimizer and scheduler states, every process's RNG states and the
trainer state (step, data position, counters), so `--resume` reaches bit-for-bit the result of an
uninterrupted run on CPU. Shared by every trainer (SFT, RM, DPO, PPO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhfkit import TrainingError, UsageError, distributed
from rlhfkit.tracking import LOCK_NAME


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


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes on disk: the trainable weights and AdamW's two moments of each (fp32)."""
    return 3 * sum(getattr(p, "ds_numel", p.numel()) * 4 for p in model.parameters() if p.requires_grad)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _no_space(what: str, path: Path, need: int, keep: int | None = None) -> TrainingError:
    free = shutil.disk_usage(path).free
    whole = (f"; a run with --save-total-limit {keep} needs about {keep + 1} × that for its checkpoints "
             "(the next one is written before the oldest goes), plus the final model") if keep else ""
    then = ("Free some space (or lower --save-total-limit), then rerun with --resume." if keep else
            "Free some space, then rerun with --resume: it saves the model from the last checkpoint (a run without "
            "--save-steps has none and must run again).")
    return TrainingError(f"disk full: {what} needs about {_mb(need)} and {path} has {_mb(free)} free{whole}. {then}")


def _out_of_space(e: BaseException, path: Path) -> bool:
    """Whether a write failed for want of space: errno ENOSPC/EDQUOT, or, since torch.save reports it only as
    "unexpected pos", any error while the disk has under 1 MiB free (looked at before the partial write goes)."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        return True
    return shutil.disk_usage(path).free < 2**20


@contextlib.contextmanager
def writing(tmp: Path, what: str, need: int, keep: int | None = None) -> Iterator[None]:
    """Write into the directory `tmp`, after checking its disk has `need` bytes free; if the write fails, `tmp` is
    removed, and a full disk is one TrainingError saying how much is needed rather than a C++ message."""
    if shutil.disk_usage(tmp.parent).free < need:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(what, tmp.parent, need, keep)
    try:
        yield
    except Exception as e:  # torch.save raises RuntimeError, safetensors a bare Exception subclass
        full = _out_of_space(e, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _no_space(what, tmp.parent, need, keep) from None
        raise


def save_directory(out: Path, write: Callable[[Path], None], need: int, what: str = "the final model") -> None:
    """Save files into `out` so that a full disk, or a kill while writing, leaves the old files as they were, never
    a config.json without its weights: `write(tmp)` fills OUT/.saving, whose entries are then renamed into OUT
    (renames need no space and take microseconds), config.json last, since it is what makes a directory a model."""
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    tmp.mkdir(parents=True)
    with writing(tmp, what, need):
        write(tmp)
    for p in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        target = out / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(p, target)
    tmp.rmdir()


def save(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, accelerator,
         keep: int = 2, config: Any = None, write: Callable[[Path], None] | None = None) -> Path:
    """Write `root/step-N` atomically and point `root/latest` at it; keep the newest `keep` checkpoints. `config`,
    the run's config dataclass, is kept beside the state so that `--resume` can check it is the same run. A full
    disk stops the run with one message (`writing`), the earlier checkpoints intact. Models held by other
    processes (PPO's Ray workers) write their own files: `write(directory)` has them write; `model`, `optimizer`
    and `scheduler` are then None."""
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir()
    accelerator.wait_for_everyone()
    need = checkpoint_bytes(trained(model)) if model is not None else 0
    with writing(tmp, f"a checkpoint (step {step})", need if accelerator.is_main_process else 0, keep):
        torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
        if model is not None:
            write_trained(tmp, model, optimizer, scheduler, accelerator.is_main_process)
        if write is not None:
            write(tmp)
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
            (tmp / "written").write_text(str(1 + max(map(written, checkpoints(root)), default=0)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        # the newest `keep` in the order they were written, not by step number: a resumed run that writes lower
        # step numbers than an earlier one left must not delete what it has just written
        old = sorted((p for p in checkpoints(root) if p != final), key=lambda p: (written(p), p.name))
        for p in old[:max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]


def written(path: Path) -> int:
    """A checkpoint's place in the order its directory's checkpoints were written (0: written before it was kept)."""
    try:
        return int((path / "written").read_text())
    except (OSError, ValueError):
        return 0


# what a resumed run may change: where its directory now is, how long it runs and how it logs and saves, and where
# PPO's Ray roles are placed (the same run, tested); anything else would make it another run
CHANGEABLE_ON_RESUME = {"output", "resume", "overwrite", "max_steps", "epochs", "iterations", "save_steps",
                        "save_total_limit", "log_steps", "eval_steps", "sample_every", "skip_nonfinite",
                        "ray_address", "colocate", "rollout_engines"}


def resume_from(root: Path, config: Any = None) -> Path | None:
    """The checkpoint `--resume` continues from: the one `root/latest` names. None when the run directory
    (root's parent) holds nothing yet, a fresh start; an error, rather than a silent restart from step 0 over an
    earlier run's files, when it holds a run but no checkpoint, or `latest` names one that is gone; and an error
    naming the keys when `config` differs from the checkpoint's beyond `CHANGEABLE_ON_RESUME` (a new --lr, say,
    would be silently overridden by the restored schedule)."""
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            if config is not None and (path / "config.json").is_file():
                saved = json.loads((path / "config.json").read_text())
                now = json.loads(json.dumps(dataclasses.asdict(config), default=str))
                changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {now.get(k)!r}" for k in sorted(now | saved)
                           if k not in CHANGEABLE_ON_RESUME and saved.get(k) != now.get(k)]
                if changed:
                    raise UsageError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
                                     "resume with the run's own settings, or start a new run (another --output)")
            return path
        raise UsageError(f"--resume: {pointer} names {path.name}, which is missing; point it at one of "
                         f"{sorted(p.name for p in root.glob('step-*')) or 'no checkpoints'} or pass --overwrite")
    earlier = sorted(p.name for p in root.parent.iterdir() if p.name != LOCK_NAME) if root.parent.is_dir() else []
    if earlier:
        raise UsageError(f"--resume: {root.parent} holds a run ({', '.join(earlier[:4])}) but no checkpoint to "
                         "continue from (runs save them with --save-steps N); pass --overwrite to start again")
    return None


def finished_run(out: Path, step: int, total: int, main: bool = True) -> dict | None:
    """For a resumed run whose checkpoint is at its last step (`step` ≥ `total`) and whose model was saved (run.json
    says "finished" once it is): its final metrics, read back, so that resuming a finished run changes nothing. None
    while there is work left, or the model still has to be saved."""
    path = out / "run.json"
    if step < total or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") == "running":
        return None
    if main:
        print(f"{out}: finished at step {step} of {total}, nothing to do (to train on, raise --max-steps, --epochs "
              "or --iterations)")
    return record.get("final_metrics", {})


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def write_model(path: Path, model, optimizer, scheduler) -> None:
    """A whole model's trained weights, its optimizer's state and its schedule into the directory `path`."""
    save_file(trainable_state(model), path / "trainable.safetensors")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")


def read_model(path: Path, model, optimizer, scheduler) -> None:
    """`write_model`'s files back into already-built objects."""
    weights = load_file(path / "trainable.safetensors")
    missing = model.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))


def trained(model):
    """The model a checkpoint holds: inside DDP, or a DeepSpeed engine (which saves itself)."""
    return model if distributed.is_engine(model) else distributed.unwrap(model)


def write_trained(path: Path, model, optimizer, scheduler, main: bool) -> None:
    """A trained model's files in the checkpoint directory `path`, every process calling: spread over the processes
    (FSDP2, a ZeRO engine), each its shards of the weights and of AdamW's state and the main process the schedule;
    else the main process all of them (`write_model`)."""
    model = trained(model)
    if distributed.is_engine(model) or distributed.is_sharded(model):
        distributed.save_shards(path / "shards", model, optimizer)
        if main:
            torch.save(scheduler.state_dict(), path / "scheduler.pt")
    elif main:
        write_model(path, model, optimizer, scheduler)


def read_trained(path: Path, model, optimizer, scheduler) -> None:
    """`write_trained`'s files back into the already-prepared objects (every process)."""
    model = trained(model)
    if distributed.is_engine(model) or distributed.is_sharded(model):
        distributed.load_shards(path / "shards", model, optimizer)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    else:
        read_model(path, model, optimizer, scheduler)


def load(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore a checkpoint into already-prepared objects; returns the trainer state. `model` None: the models are
    held by other processes, which read their own files (`read_trained`)."""
    if model is not None:
        read_trained(path, model, optimizer, scheduler)
    set_rng_state(torch.load(path / f"rng_{accelerator.process_index}.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
