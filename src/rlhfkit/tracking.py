"""A run's directory: claimed by one process at a time (`claim_output`), metrics.jsonl (one JSON object per logged
step) and TensorBoard events; and one measure of the machine's speed at the time of a run (`matmul_peak`), beside
which its timings are read."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import IO

from rlhfkit import UsageError

LOCK_NAME = ".rlhfkit.lock"
_held: dict[Path, IO[str]] = {}  # output directories this process has claimed, with their open lock files


def claim_output(out: str | Path, resume: bool, overwrite: bool, keep_contents: bool = False) -> Path:
    """Make OUT this process's run directory, so that no run destroys another:
    - a directory another live process is writing is refused, naming the holder's pid. The lock is an flock on
      OUT/.rlhfkit.lock, which the kernel releases when its process ends however it ends (a SIGKILL leaves no
      stale lock);
    - a directory holding an earlier run's files is refused unless `resume` (continue it) or `overwrite` (its
      contents are removed first); `keep_contents` skips this check, for commands that resume by themselves
      (the pipeline's completed stages).
    Claiming again in the same process is allowed (a run in-process after another); `release_output` ends it."""
    out = check_output(out, directory=True)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key not in _held:
        lock = (out / LOCK_NAME).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(f"--output {out} is in use by {holder} (lock {out / LOCK_NAME}); wait for that run to "
                             "end or choose another --output") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        _held[key] = lock
    earlier = sorted(p for p in out.iterdir() if p.name != LOCK_NAME)
    if earlier and not (resume or keep_contents):
        if not overwrite:
            release_output(out)
            names = ", ".join(p.name for p in earlier[:4]) + (", …" if len(earlier) > 4 else "")
            raise UsageError(f"--output {out} already holds a run ({names}): pass --resume to continue it or "
                             "--overwrite to replace it")
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return out


def check_output(path: str | Path, option: str = "--output", directory: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory where a file goes (or a file where a
    directory goes), or a file where one of its parent directories must be."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UsageError(f"{option} {path}: a {'file' if directory else 'directory'} of that name exists; name a "
                         f"{'directory' if directory else 'file'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is a file, not a directory")
    return path


def release_output(out: str | Path) -> None:
    """End `claim_output`'s claim on OUT (the lock file stays; only its flock mattered)."""
    lock = _held.pop(Path(out).resolve(), None)
    if lock is not None:
        lock.close()


class Tracker:
    """Writes on the main process only; other processes get a tracker that does nothing.

    `resume_step`: the step a resumed run continues from. What the interrupted run logged after it is dropped
    (`truncate_jsonl`; TensorBoard's `purge_step`), since the resumed run logs those steps again; None starts
    afresh."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.path, "step", resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (v if isinstance(v, (int, str)) else float(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Keep the rows of a JSON-lines log whose `key` is at most `last` (a resumed run writes the later ones again);
    a torn last line, left by a kill mid-write, goes too. Rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get(key, 0) <= last:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def matmul_peak(dtype, n: int = 2048, seconds: float = 3.0, device="cpu") -> float:
    """Achieved GFLOP/s of an n×n @ n×n torch.matmul in `dtype` (2·n³ FLOPs each), sustained over `seconds`.

    Warm-up first (oneDNN/cuBLAS pick and cache their kernels, and pages get touched, on the first calls),
    then as many matmuls as fit in `seconds`, into a preallocated output so allocation is not timed.
    Uses torch's default thread count, like training does. dtype: a torch dtype; device: a torch device or its name.
    """
    import torch

    device = torch.device(device)

    def sync() -> None:  # CUDA kernels are asynchronous: without a sync the timer measures launch time
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    warm_until = time.perf_counter() + min(0.5, seconds / 4)
    for _ in range(2):  # at least two calls, then more until the warm-up time is spent
        torch.matmul(a, b, out=out)
    while time.perf_counter() < warm_until:
        torch.matmul(a, b, out=out)
    sync()

    iters = 0
    start = time.perf_counter()
    while True:
        torch.matmul(a, b, out=out)
        iters += 1
        if iters % 4 == 0 or device.type != "cuda":  # on CUDA, sync only now and then to keep the queue full
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * n**3 * iters / elapsed / 1e9


def machine_speed(dtype: str) -> float:
    """GFLOP/s of a 2048² matmul over one second (`matmul_peak`) in "bf16" or "fp32", as the benchmarks measure
    the peak. Not bf16 where it is not native: there one such matmul takes ~20 s."""
    import torch

    return round(matmul_peak({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], seconds=1.0), 1)
