"""Shared fixtures: the tiny model's tokenizer, a fresh accelerate state per in-process training run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N (pytest-xdist): the N workers share the cores, each computing on its share of them, and so do the
    # CLIs it starts (torch reads this when it is imported); with every core each, their OpenMP teams fight for the
    # cores and the run takes longer than in one process
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def native_bf16() -> bool:
    """bf16 matmuls in hardware: AVX512-BF16 or AMX (`RLHFKIT_CPU_BF16=0|1` overrides), or a CUDA device."""
    import torch

    from rlhfkit import models

    return models.cpu_supports_bf16() or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# bf16 tests run where bf16 is native; elsewhere oneDNN emulates it, rounding otherwise and at < 1 GFLOP/s
needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="no native bf16 on this machine (AVX512-BF16, AMX "
                                       "or CUDA): bf16 is emulated here, rounds otherwise and crawls")
BF16 = pytest.param("bf16", marks=needs_native_bf16)


@pytest.fixture(scope="session")
def tok():
    from rlhfkit import models

    return models.load_tokenizer("tiny-llama")


@pytest.fixture(scope="session", autouse=True)
def deterministic_cuda():
    """On a GPU, the bit-exact tests (resume = uninterrupted run) need deterministic kernels: the memory-efficient
    attention backward and some scatter-adds accumulate in whatever order their threads finish. The CPU kernels
    are deterministic already, so this changes nothing there."""
    import torch

    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such kernel warns, not fails
    yield


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch computes on `n` threads in this process inside the block."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The tiny model runs faster on one thread than on two that another process is also using."""
    with torch_threads(1):
        yield


def run_cli(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None,
            ) -> subprocess.CompletedProcess:
    """Run `rlhfkit ARGS` in a fresh process (as a user would)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhfkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def needs_devices(processes: int) -> None:
    """Skip where `processes` processes would share one CUDA device: NCCL refuses that ('Duplicate GPU
    detected'). On the CPU (gloo) any number of processes run."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        pytest.skip(f"{processes} processes need {processes} GPUs; this machine has {torch.cuda.device_count()}")


def torchrun(processes: int, args) -> list[str]:
    """The command line of `rlhfkit ARGS` on `processes` processes of this machine (gloo on the CPU), as a user
    would launch it; --standalone picks a free rendezvous port, so tests may run side by side."""
    needs_devices(processes)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "rlhfkit.cli", *args]


def run_distributed(processes: int, *args: str, check: bool = True, timeout: int = 300, env: dict | None = None
                    ) -> subprocess.CompletedProcess:
    """Run `rlhfkit ARGS` on `processes` processes with torchrun (`torchrun`)."""
    full_env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(torchrun(processes, args), capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun rlhfkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_accelerate(processes: int, *args: str, timeout: int = 300) -> None:
    """Run `rlhfkit ARGS` on `processes` processes with `accelerate launch`, as a user would. On a CPU-only machine
    accelerate starts several processes (torchrun, gloo) only with --multi_gpu; --cpu or no flag at all silently runs
    one process."""
    needs_devices(processes)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhfkit.cli", *args]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def launch_and_kill(processes: int, args: list[str], until: Path, timeout: float = 240) -> None:
    """Start `rlhfkit ARGS` on `processes` processes with torchrun and SIGKILL the launcher and every worker at
    once, as a lost machine would, as soon as `until` exists (a checkpoint directory, say)."""
    proc = subprocess.Popen(torchrun(processes, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline and not until.exists():
        time.sleep(0.02)

    def tree() -> list[int]:
        """torchrun and its live descendants (its workers run in sessions of their own, so no process group or
        session holds them all)."""
        parent = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
            except OSError:  # the process has just ended
                continue
            if fields[0] != "Z":
                parent[int(stat.parent.name)] = int(fields[1])
        found, grew = {proc.pid} if proc.pid in parent else set(), True
        while grew:
            new = {p for p, pp in parent.items() if pp in found} - found
            found |= new
            grew = bool(new)
        return sorted(found)

    for pid in tree():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while tree():
        time.sleep(0.02)


def train_losses(run_dir: Path) -> list[float]:
    """`train/loss` of every logged step, in order, from the run's metrics.jsonl."""
    from rlhfkit.tracking import read_metrics

    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


def rewind(run_dir: Path, step: int) -> None:
    """Leave exactly what a run stopped after `step` steps leaves: later checkpoints and the final model go,
    `latest` points at step `step`."""
    ckpts = run_dir / "checkpoints"
    keep = f"step-{step:07d}"
    for later in ckpts.glob("step-*"):
        if later.name > keep:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(keep)
    for final in ("model.safetensors", "adapter_model.safetensors"):  # a whole model or a LoRA adapter
        (run_dir / final).unlink(missing_ok=True)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def polite_pairs(n: int, seed: int = 0) -> list[dict]:
    """A learnable rule: the chosen reply thanks the user, the rejected one brushes them off; same content."""
    rng = random.Random(seed)
    topics = ["the weather", "my homework", "the train", "dinner", "the meeting", "a book", "the garden", "my phone",
              "the car", "a song", "the movie", "the beach", "coffee", "the news", "football", "the cat"]
    bodies = ["it is fine", "it went well", "it is nice today", "I like it", "it was late", "it looks good"]
    rows = []
    for _ in range(n):
        body = rng.choice(bodies)
        rows.append({"prompt": f"{rng.choice(['Tell me about', 'Explain', 'Describe'])} {rng.choice(topics)}.",
                     "chosen": f"Thanks for asking, {body}.", "rejected": f"Ugh, whatever, {body}."})
    return rows
