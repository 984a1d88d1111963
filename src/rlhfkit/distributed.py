"""Training on several processes: how a trained model is spread over them (`--sharding`) and what that changes in a
trainer's step, its checkpoints and its final save.

- ddp: every process holds the whole model and optimizer; accelerate wraps the model in DDP, which all-reduces the
  gradients in the backward pass.
- fsdp2: torch's FSDP2 (`fully_shard`) on every transformer block and then on the root: each process keeps 1/N
  of the parameters, gradients and AdamW state, all-gathers a block's parameters just before the block runs and
  frees them after, and reduce-scatters its gradients in the backward pass (averaged over the processes, as DDP
  does). Compute precision is unchanged (fp32 weights, bf16 autocast where native). accelerate is not used for
  the model here: on the CPU it never selects FSDP (only DDP), so the shards are made with torch directly.

Both need every process to run the same number of forward and backward passes (FSDP2 gathers in every forward,
DDP reduces in a backward): `training.micro_batches` gives every process as many micro-batches as the busiest,
with a weight-0 stand-in row where a process has none left.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from rlhfkit import UsageError

SHARDINGS = ("ddp", "fsdp2")


def check(cfg) -> None:
    """The --sharding of a trainer's config (`training.RunConfig`), and what it does not combine with."""
    if cfg.sharding not in SHARDINGS:
        raise UsageError(f"--sharding {cfg.sharding!r}: expected one of {', '.join(SHARDINGS)}")
    if cfg.sharding == "fsdp2" and cfg.dtype == "fp16":  # fp16 needs a gradient scaler that knows the shards
        raise UsageError("--sharding fsdp2 runs in fp32 or bf16: use --dtype bf16 (or auto, fp32)")
    if cfg.sharding == "fsdp2" and cfg.lora and cfg.merge:  # the merge runs on one process's whole model
        raise UsageError("--merge with --sharding fsdp2 is not supported: the adapter is saved; merge it in one "
                         "process afterwards, or train with --sharding ddp")



def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def transformer_blocks(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's blocks (the `layers` list of a Hugging Face decoder, wherever the model wraps it)."""
    for name, m in module.named_modules():
        if name.rpartition(".")[2] == "layers" and isinstance(m, torch.nn.ModuleList):
            return m
    raise UsageError(f"--sharding fsdp2: {type(module).__name__} has no `layers` list of transformer blocks to shard")


def shard(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """FSDP2 over all processes: each transformer block its own unit (gathered only while it runs), then `module`
    (the rest: embeddings, final norm, heads). `module` is changed in place and returned; collect its parameters
    for the optimizer after this, as they are now DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    module.to(accelerator.device)  # each process's GPU (accelerate has chosen it), or the CPU
    for block in transformer_blocks(module):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def prepare_model(net: torch.nn.Module, sharding: str, accelerator) -> tuple[torch.nn.Module, bool]:
    """The trained model spread over the processes: sharded with fsdp2 (`shard`; the optimizer is then built on
    its parameters and used as it is), else through accelerate (DDP, when there are several processes). Returns
    the model to train and whether it is sharded."""
    if sharding == "fsdp2" and accelerator.num_processes > 1:
        return shard(net, accelerator), True
    return accelerator.prepare_model(net), False


@contextlib.contextmanager
def gathered(*modules: torch.nn.Module):
    """Sharded modules whole on every process for a while: each FSDP2 unit's parameters all-gathered once on entry
    and kept through any number of forwards, back to the shards on exit. PPO's rollout needs it: sampling and the
    log-prob passes run a different number of forwards on each process, which per-forward gathers cannot match.
    Plain modules pass through. The roots (`modules`) must have run a forward already (FSDP2 takes the module its
    first forward runs through as the root)."""
    from torch.distributed.fsdp import FSDPModule

    units = [u for m in modules for u in m.modules() if isinstance(u, FSDPModule)]
    blocks = [u for u in units if not any(u is m for m in modules)]  # a root keeps its parameters after forward
    for u in blocks:
        u.set_reshard_after_forward(False, recurse=False)
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
        for u in blocks:
            u.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def gradient_sync(models: list[torch.nn.Module], sync: bool):
    """A context for one forward and backward: reduce the gradients across processes (`sync`, the last micro-batch
    of a step), or only accumulate them locally (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`). On exit
    both sync again, so a backward after it (PPO-ptx's) reduces."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    with contextlib.ExitStack() as stack:
        sharded = [m for m in models if isinstance(m, FSDPModule)]
        for m in models:
            if isinstance(m, DistributedDataParallel) and not sync:
                stack.enter_context(m.no_sync())
        for m in sharded:
            m.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            for m in sharded:
                m.set_requires_gradient_sync(True)


def full_state_dict(module: torch.nn.Module, strip: str = "") -> dict[str, torch.Tensor] | None:
    """A sharded model's whole weights on the CPU, gathered from the shards, their names without the prefix
    `strip` (every process must call this; the main process gets them, the others None). None for a model that
    is not sharded: it saves its own."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(strip): v for k, v in state.items()} if torch.distributed.get_rank() == 0 else None


def save_shards(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Each process writes its shards of the model and the optimizer state under `path` (torch.distributed.
    checkpoint; every process must call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)


def load_shards(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Read what `save_shards` wrote back into the sharded model and optimizer (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def report(sharded: bool, params: list[torch.Tensor], optimizer, accelerator) -> dict:
    """For run.json: the processes, how the model was spread over them, and what this process held of the trained
    parameters and of the optimizer's state, in bytes (the whole with ddp, its shards with fsdp2)."""
    world = accelerator.num_processes
    return {"processes": world, "sharding": None if world == 1 else "fsdp2" if sharded else "ddp",
            "bytes_per_process": bytes_per_process(params, optimizer)}


def bytes_per_process(params: list[torch.Tensor], optimizer) -> dict[str, int]:
    """Bytes of `params` and of the optimizer's state tensors that this process holds."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard
        return t.numel() * t.element_size()

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"parameters": sum(map(local, params)), "optimizer": sum(map(local, state))}


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"  # in a source checkout


def accelerate_launch(argv: list[str]) -> list[str] | None:
    """`rlhfkit CMD … --accelerate-config NAME|PATH [--num-processes N]`, as TRL's CLI takes it: the command line
    that runs `rlhfkit CMD …` again under `accelerate launch` with that config (NAME: configs/accelerate/NAME.yaml),
    with `--sharding fsdp2` added for an FSDP config. None when the options are not there."""
    import yaml

    options, rest, i = {}, [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key in ("--accelerate-config", "--num-processes"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{key} needs a value")
                value, i = argv[i + 1], i + 1
            options[key] = value
        else:
            rest.append(argv[i])
        i += 1
    if "--accelerate-config" not in options:
        if "--num-processes" in options:
            raise UsageError("--num-processes goes with --accelerate-config (or launch with torchrun)")
        return None
    name = options["--accelerate-config"]
    path = Path(name) if name.endswith((".yaml", ".yml")) or "/" in name else ACCELERATE_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))) or "none found"
        raise UsageError(f"--accelerate-config {name}: no such file {path} (the names: {names})")
    kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type", "NO")
    if kind == "DEEPSPEED":
        raise UsageError(f"--accelerate-config {name}: DeepSpeed is not wired in rlhfkit yet; use fsdp2 "
                         "(docs/distributed.md)")
    sharding = [a for j, a in enumerate(rest) if rest[j - 1] == "--sharding" or a.startswith("--sharding=")]
    if kind == "FSDP":
        if any(s.removeprefix("--sharding=") != "fsdp2" for s in sharding):
            raise UsageError(f"--accelerate-config {name} shards with FSDP2: drop --sharding or pass fsdp2")
        rest += [] if sharding else ["--sharding", "fsdp2"]
    processes = ["--num_processes", options["--num-processes"]] if "--num-processes" in options else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), *processes,
            "-m", "rlhfkit.cli", *rest]
