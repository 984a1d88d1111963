"""Metrics for every run: metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import math
from pathlib import Path


class Tracker:
    """Writes on the main process only; other processes get a tracker that does nothing."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

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


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
