"""Training on several processes: how a trained model is spread over them (`--sharding`) and what that changes in a
trainer's step, its checkpoints and its final save.

- ddp: every process holds the whole model and optimizer; accelerate wraps the model in DDP, which all-reduces the
  gradients in the backward pass.
- fsdp2: torch's FSDP2 (`fully_shard`) on every transformer block and then on the root: each process keeps 1/N
  of the parameters, gradients and AdamW state, all-gathers a block's parameters just before the block runs and
  frees them after, and reduce-scatters its gradients in the backward pass (averaged over the processes, as DDP
  does). Compute precision is unchanged (fp32 weights, bf16 autocast where native). accelerate is not used for
  the model here: on the CPU it never selects FSDP (only DDP), so the shards are made with torch directly.

- zero2, zero3: DeepSpeed's ZeRO (an optional dependency, imported only when chosen), its engine built here around
  the model and the trainer's AdamW (`deepspeed.initialize`; accelerate's DeepSpeed path needs a GPU, and a
  trainer's own loop must own the step): stage 2 splits the gradients and AdamW state over the processes and keeps
  the weights whole on each; stage 3 splits the weights too, gathered module by module as they run. The engine
  takes the backward passes (`backward`) and the step (`step`: DeepSpeed clips to `--max-grad-norm` and skips a
  step whose gradient norm is not finite); batching stays the trainer's (the engine's batch sizes are nominal).

All need every process to run the same number of forward and backward passes (FSDP2 and ZeRO-3 gather in every
forward, DDP and ZeRO reduce in a backward): `training.micro_batches` gives every process as many micro-batches as
the busiest, with a weight-0 stand-in row where a process has none left.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rlhfkit import UsageError

SHARDINGS = ("ddp", "fsdp2", "zero2", "zero3")


def check(cfg) -> None:
    """The --sharding of a trainer's config (`training.RunConfig`), and what it does not combine with."""
    if cfg.sharding not in SHARDINGS:
        raise UsageError(f"--sharding {cfg.sharding!r}: expected one of {', '.join(SHARDINGS)}")
    if cfg.sharding != "ddp" and cfg.dtype == "fp16":  # fp16 needs a gradient scaler that knows the shards
        raise UsageError(f"--sharding {cfg.sharding} runs in fp32 or bf16: use --dtype bf16 (or auto, fp32)")
    if cfg.sharding in ("fsdp2", "zero3") and cfg.lora and cfg.merge:  # the merge runs on one process's whole model
        raise UsageError(f"--merge with --sharding {cfg.sharding} is not supported: the adapter is saved; merge it "
                         "in one process afterwards, or train with --sharding ddp")
    if cfg.sharding.startswith("zero"):
        deepspeed()  # installed, or one clear error before any model is loaded


def several_processes() -> bool:
    """Whether this process is one of several (a process group of more than one)."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def whole_rows(module: torch.nn.Module, sharding: str) -> bool:
    """Whether a trainer must run `module` on whole rows, not on shared prefixes (a prompt run once, its rows'
    suffixes on top): FSDP2 and ZeRO-3 gather the weights in every forward, so every process must call the blocks
    equally often, and a shared prefix is one more call where a batch has one; and under ZeRO-2, in the 2-process
    PPO test, the shared-prefix forward gave process 1 wrong updates for the first weights of its part of the
    gradients (layer 1's q/k/v projections of tiny-llama moved by up to 2 × lr against one process's update; with
    whole rows, the same update)."""
    return is_sharded(module) or is_partitioned(module) or (several_processes() and sharding.startswith("zero"))


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


def shard_root(module: torch.nn.Module, accelerator, first_forward: Callable[[torch.nn.Module], object]):
    """`shard`, then `first_forward(module)` without gradients so that FSDP2 takes `module` as the root (the module
    its first forward runs through), then its parameters back to shards (a root keeps them whole after a forward;
    an optimizer must get the shards). For models used whole between `gathered` (PPO's roles)."""
    shard(module, accelerator)
    with torch.no_grad():
        first_forward(module)
    module.reshard()
    return module


def prepare_model(net: torch.nn.Module, sharding: str, accelerator) -> torch.nn.Module:
    """The trained model spread over the processes, before its optimizer is built on its parameters: sharded in
    place with fsdp2 (`shard`), on the device for ZeRO (whose engine `prepare_optimizer` builds), else through
    accelerate (DDP, when there are several processes). One process: as it is, on the device."""
    if accelerator.num_processes > 1 and sharding == "fsdp2":
        return shard(net, accelerator)
    if accelerator.num_processes > 1 and sharding.startswith("zero"):
        return net.to(accelerator.device)
    return accelerator.prepare_model(net)


def prepare_optimizer(net: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, accelerator):
    """Step two of spreading a trained model (after `prepare_model`, and the optimizer and schedule built on its
    parameters): with ZeRO, the DeepSpeed engine around both, which the trainer then calls as its model; with
    FSDP2 both as they are; else accelerate's optimizer (its fp16 gradient scaler). Returns (model, optimizer)."""
    if accelerator.num_processes > 1 and cfg.sharding.startswith("zero"):
        return zero_engine(net, optimizer, cfg, accelerator), optimizer
    if is_sharded(net):
        return net, optimizer
    return net, accelerator.prepare_optimizer(optimizer)


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP or a ZeRO engine (FSDP2 shards in place: the model itself). Not accelerate's
    unwrap_model, which imports deepspeed (about a second) in every run where it is installed."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or is_engine(model):
        model = model.module
    return model


def deepspeed_quietly() -> None:
    """Without a GPU, tell deepspeed (wherever it gets imported: here, or by transformers and accelerate when it is
    installed) that it runs on the CPU; its own detection prints a warning on stdout, where commands print their
    results."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed():
    """The deepspeed module (an optional dependency), or one clear error."""
    deepspeed_quietly()
    try:
        import deepspeed
    except ImportError as e:
        raise UsageError(f"--sharding zero2/zero3 needs DeepSpeed ({e}): pip install 'rlhfkit[deepspeed]'") from None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) would bury the bar
    return deepspeed


def zero_engine(module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg, accelerator):
    """A DeepSpeed engine with ZeRO stage 2 or 3 (`cfg.sharding`) around `module` and its AdamW, on the process
    group accelerate has set up. The trainer keeps its own batching: the engine's batch sizes are nominal
    (DeepSpeed wants them consistent), and it does not count micro-batches or scale the loss by them
    (`managed_gradient_accumulation` off: each `backward` accumulates, `step` ends the step). It clips to
    `--max-grad-norm` in its step."""
    ds = deepspeed()
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "train_batch_size": accelerator.num_processes, "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": int(cfg.sharding.removeprefix("zero"))},
        "gradient_clipping": max(cfg.max_grad_norm, 0.0),
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the trainers' own, its numerics tested against DDP
        "steps_per_print": 2**62, "wall_clock_breakdown": False,
    }
    with contextlib.redirect_stdout(sys.stderr):  # it reports building its CPU communication op on stdout
        engine, *_ = ds.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    if is_partitioned(module):
        from rlhfkit import forward

        for m in module.modules():  # its forward reads the head's weight, not the head's forward: gather it then
            if isinstance(m, forward.SelectedLogits):
                ds.zero.register_external_parameter(m, m.lm.get_output_embeddings().weight)
    return engine


def is_engine(module) -> bool:
    """Whether `module` is a DeepSpeed engine (never true while deepspeed has not been imported)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(module, ds.DeepSpeedEngine)


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 has split `module`'s weights over the processes (each holds `ds_tensor`, its part)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def backward(loss: torch.Tensor, engine, accelerator) -> None:
    """loss.backward() as the model's wrapper wants it: a ZeRO `engine`'s (it reduces the gradients into its
    partitions), else accelerate's (its fp16 loss scaling; DDP reduces in the backward pass)."""
    if is_engine(engine):
        engine.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def step(engine, params: list[torch.Tensor], optimizer, clip: float, accelerator,
         skip: Callable[[float], bool]) -> float | None:
    """One optimizer step on the gradients the backward passes left, then the gradients cleared: clip them to
    `clip` (inf: not at all) and step, unless `skip(norm)` says to skip (it may raise, to stop the run). Returns
    the gradient norm before clipping, None when skipped. A ZeRO `engine` does it in its own step (it clips to the
    config's clip, and skips a step whose gradient norm is not finite, as `skip` would ask); `skip` then sees the
    norm after the step (a non-finite loss has a non-finite gradient)."""
    if is_engine(engine):
        engine.step()
        norm = float(engine.get_global_grad_norm())
        return None if skip(norm) else norm
    norm = float(accelerator.clip_grad_norm_(params, clip))
    if skip(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


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
    module = unwrap(module)
    if is_partitioned(module):  # ZeRO-3: gathered module by module, kept by the main process
        return zero3_state_dict(module, strip)
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(strip): v for k, v in state.items()} if torch.distributed.get_rank() == 0 else None


def zero3_state_dict(module: torch.nn.Module, strip: str) -> dict[str, torch.Tensor] | None:
    """`full_state_dict` of a ZeRO-3 module: one module's weights gathered at a time (as DeepSpeed's own
    consolidation does), copied to the CPU by the main process."""
    gather = deepspeed().zero.GatheredParameters
    main = torch.distributed.get_rank() == 0
    state = {}
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        with gather([p for _, p in own]):
            if main:
                state |= {f"{prefix}.{n}".lstrip("."): p.detach().cpu().clone() for n, p in own}
    if not main:
        return None
    keys = module.state_dict().keys()  # the parameters and the persistent buffers
    state |= {n: b.detach().cpu() for n, b in module.named_buffers() if n in keys}
    return {k.removeprefix(strip): state[k] for k in keys}


def save_shards(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Each process writes its shards of the model and the optimizer state under `path` (torch.distributed.
    checkpoint; a ZeRO engine's own checkpoint, its AdamW partitions; every process must call this)."""
    if is_engine(model):
        model.save_checkpoint(str(path), tag="zero", save_latest=False)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not optimizer.state:
        # no step taken yet (PPO's actor in --critic-warmup): DCP would create AdamW's state with a zero-gradient
        # step, which counts in its bias correction, so saving would change the training; the model alone
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path)
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)


def load_shards(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Read what `save_shards` wrote back into the sharded model and optimizer (every process)."""
    if is_engine(model):
        model.load_checkpoint(str(path), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if not any(k.startswith("optimizer.") for k in saved):  # saved before the optimizer's first step
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def sharding_of(net) -> str | None:
    """How the model the loop calls is spread: zero2/zero3 (a DeepSpeed engine), fsdp2, ddp, or None (one process)."""
    if is_engine(net):
        return f"zero{net.zero_optimization_stage()}"
    if is_sharded(net):
        return "fsdp2"
    return "ddp" if several_processes() else None


def report(net, params: list[torch.Tensor], optimizer, accelerator) -> dict:
    """For run.json: the processes, how the model (as the loop calls it) was spread over them, and what this process
    held of the trained parameters and of the optimizer's state, in bytes (the whole with ddp, its shards with
    fsdp2 and zero3; zero2 splits only the optimizer's state)."""
    return {"processes": accelerator.num_processes, "sharding": sharding_of(net),
            "bytes_per_process": bytes_per_process(params, optimizer)}


def bytes_per_process(params: list[torch.Tensor], optimizer) -> dict[str, int]:
    """Bytes of `params` and of the optimizer's state tensors that this process holds."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"parameters": bytes_held(params), "optimizer": bytes_held(state)}


def bytes_held(tensors: list[torch.Tensor]) -> int:
    """Bytes of `tensors` that this process holds: a DTensor's own shard, ZeRO-3's part of a weight."""
    def local(t: torch.Tensor) -> int:
        t = t.ds_tensor if hasattr(t, "ds_tensor") else t
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    return sum(map(local, tensors))


def from_launcher(cfg) -> None:
    """Under `accelerate launch` with an FSDP or DeepSpeed config, the sharding that config asks for (fsdp2; zero2,
    zero3 from its ZeRO stage) becomes `cfg.sharding`, and accelerate is told to leave the model alone: rlhfkit
    shards it itself (`prepare_model`, `prepare_optimizer`), and an Accelerator in FSDP or DeepSpeed mode would
    change what its backward and clipping do. Settings such a config has beyond that (offload, its own batch
    sizes) are not read; offload is refused rather than ignored."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise UsageError("accelerate config: rlhfkit shards with FSDP2 only; set fsdp_version: 2 "
                             "(configs/accelerate/fsdp2.yaml)")
        wanted = "fsdp2"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        wanted = zero_sharding({"zero_stage": os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
                                "deepspeed_config_file": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
                                **{f"offload_{k}_device": os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k.upper()}"
                                                                         "_DEVICE") for k in ("optimizer", "param")}})
    else:
        return
    if cfg.sharding not in ("ddp", wanted):  # ddp is also the default, which the config overrides
        raise UsageError(f"--sharding {cfg.sharding} with an accelerate config that asks for {wanted}: drop "
                         "--sharding or pass the config's")
    cfg.sharding = wanted
    os.environ["ACCELERATE_USE_FSDP"] = os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"


def zero_sharding(ds: dict) -> str:
    """The --sharding (zero2, zero3) an accelerate config's `deepspeed_config` section asks for: its zero_stage, or
    that of its deepspeed_config_file (DeepSpeed's own JSON). One clear error for a stage rlhfkit does not run, or
    for offload, which it does not support."""
    import json

    stage, offloaded = ds.get("zero_stage"), [k for k in ("optimizer", "param")
                                              if str(ds.get(f"offload_{k}_device") or "none").lower() != "none"]
    if (file := ds.get("deepspeed_config_file")) and file != "None":
        zero = json.loads(Path(file).read_text()).get("zero_optimization", {})
        stage = zero.get("stage", stage)
        offloaded = [k for k in ("optimizer", "param") if zero.get(f"offload_{k}", {}).get("device", "none") != "none"]
    if str(stage) not in ("2", "3"):
        raise UsageError(f"accelerate config: DeepSpeed ZeRO stage {stage}; rlhfkit runs stages 2 and 3 "
                         "(configs/accelerate/zero2.yaml, zero3.yaml)")
    if offloaded:
        raise UsageError(f"accelerate config: DeepSpeed offload of the {' and '.join(offloaded)} is not supported by "
                         "rlhfkit; set the offload devices to none")
    return f"zero{stage}"


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"  # in a source checkout


def accelerate_launch(argv: list[str]) -> list[str] | None:
    """`rlhfkit CMD … --accelerate-config NAME|PATH [--num-processes N]`, as TRL's CLI takes it: the command line
    that runs `rlhfkit CMD …` again under `accelerate launch` with that config (NAME: configs/accelerate/NAME.yaml;
    an FSDP or DeepSpeed config's sharding is taken up by `from_launcher`). None when the options are not there."""
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
    config = yaml.safe_load(path.read_text()) or {}
    kind = config.get("distributed_type", "NO")
    wanted = "fsdp2" if kind == "FSDP" else zero_sharding(config.get("deepspeed_config") or {}) \
        if kind == "DEEPSPEED" else None
    sharding = [a for j, a in enumerate(rest) if j and rest[j - 1] == "--sharding" or a.startswith("--sharding=")]
    if wanted and any(s.removeprefix("--sharding=") != wanted for s in sharding):
        raise UsageError(f"--accelerate-config {name} shards with {wanted}: drop --sharding or pass {wanted}")
    processes = ["--num_processes", options["--num-processes"]] if "--num-processes" in options else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), *processes,
            "-m", "rlhfkit.cli", *rest]
