"""PPO's roles as Ray actors: `rlhfkit ppo --backend ray [--ray-address ADDR] [--colocate all|actor-ref|
critic-reward|none] [--rollout-engines K]`.

The driver (the `rlhfkit ppo` process) runs algos/ppo.py's numbered loop as it is; `RayRoles` is the loop's
interface to the roles, the same as `ppo.InProcess`, and each of its calls is a method of a Ray actor (`RoleWorker`)
that holds one role and runs ppo.py's own functions on it: the actor (a `ppo.Learner`: its log-prob pass, backward
passes and optimizer steps; the final save), the critic (another `ppo.Learner`), the reference, the reward model
and/or function, and K rollout engines (hf or vLLM), each sampling an equal share of an iteration's prompts. The
rollout batch goes to the workers through Ray's object store (`ray.put` once per iteration), the actor's weights to
the engines the same way after every update.

The actor and the critic may each be a group of workers (--actor-workers, --critic-workers: OpenRLHF's
--actor_num_gpus_per_node, veRL's n_gpus_per_node): one torch.distributed process group per role (gloo on CPUs,
NCCL on GPUs), whose members train it as the processes of `torchrun` do (`ppo.Learner` with the member's `Shard`
of the rows), replicated (--sharding ddp) or sharded (fsdp2). Every call to such a role goes to all its members
at once (their collectives must meet); each works on its share of the rows, and the driver joins the shares.

Placement (OpenRLHF's and veRL's design): one placement group whose bundles are devices, in device groups. --colocate
all puts every role in one device group (veRL's default: they take turns on the same GPUs), actor-ref and
critic-reward put those pairs together (OpenRLHF's --colocate_actor_ref / --colocate_critic_reward) and the rest in
groups of their own, none gives every role its own. A device group has as many bundles as its largest role has
workers; member k of a role is on bundle k of its group. A bundle is one GPU where the cluster has GPUs (the workers
on it share it, num_gpus 1/k), else one CPU; a local cluster (no --ray-address) is started with as many CPUs as
there are bundles.

Departures from OpenRLHF and veRL, and why:
- The reference, the reward model and each rollout engine are one worker (one device) each; a frozen model too big
  for one device runs with the local backend (torchrun and --shard-frozen, docs/distributed.md).
- DeepSpeed ZeRO (--sharding zero2/zero3) is not offered for a role group: its engine clips and steps its model on
  its own, and the two roles here clip by their joint norm.
- The actor and the critic clip their gradients together, as one process does (`ppo.Learner.step`): each worker
  reports its gradients' norm and the driver clips both by the joint norm, so that the two backends make the same
  update (OpenRLHF clips each model on its own).
- Checkpoints are written by each trained role into its own subdirectory of the checkpoint (actor/, critic/), the
  driver writing the trainer state beside them; on a multi-node cluster --output must be on a filesystem every
  node sees.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit import RlhfkitError, TrainingError, UsageError, checkpoint, distributed, forward, models
from rlhfkit.algos import ppo_setup
from rlhfkit.config import write_run_json
from rlhfkit.rollout import Samples, SamplingParams, concat
from rlhfkit.training import accelerator_for

if TYPE_CHECKING:
    from rlhfkit.algos.ppo import PPOConfig, Rollout

COLOCATE = ("all", "actor-ref", "critic-reward", "none")
NAMESPACE = "rlhfkit"  # the workers' names (`worker_name`), for `ray.get_actor(name, namespace=NAMESPACE)`
INSTALL = "pip install 'rlhfkit[ray]' (scripts/setup installs it)"


def ray():
    """Ray, imported only when --backend ray is chosen, or one clear error."""
    try:
        import ray as ray_module
    except ImportError:
        raise UsageError(f"--backend ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray_module


def check(cfg: PPOConfig) -> None:
    ray()
    if cfg.colocate not in COLOCATE:
        raise UsageError(f"--colocate {cfg.colocate!r}: expected one of {', '.join(COLOCATE)}")
    if cfg.rollout_engines < 1 or cfg.rollout_prompts % cfg.rollout_engines:
        raise UsageError(f"--rollout-engines {cfg.rollout_engines}: must be ≥ 1 and divide --rollout-prompts "
                         f"{cfg.rollout_prompts} (each engine samples an equal share)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--backend ray places the roles itself: run it as one process, not under torchrun or "
                         "accelerate launch")
    for role, n in (("actor", cfg.actor_workers), ("critic", cfg.critic_workers)):
        if n < 1 or cfg.rollout_prompts % n:
            raise UsageError(f"--{role}-workers {n}: must be ≥ 1 and divide --rollout-prompts {cfg.rollout_prompts} "
                             "(each worker trains on an equal share of the rows)")
    if cfg.sharding not in ("ddp", "fsdp2"):
        raise UsageError(f"--backend ray trains a role group with --sharding ddp or fsdp2, not {cfg.sharding} "
                         "(DeepSpeed's engine clips and steps its model alone; the actor and the critic clip by "
                         "their joint norm); use --backend local for ZeRO")
    if cfg.shard_frozen:
        raise UsageError("--backend ray runs the reference and the reward model as one worker each: --shard-frozen "
                         "shards them over the processes of the local backend (torchrun); drop it, or use "
                         "--backend local")


def role_names(cfg: PPOConfig) -> list[str]:
    """The workers of a run: actor, critic (GAE), ref (none with --lora: the actor with its adapter off), reward,
    and the rollout engines rollout0, rollout1, …"""
    names = ["actor", *(["critic"] if cfg.advantage == "gae" else []), *([] if cfg.lora else ["ref"]), "reward"]
    return names + [f"rollout{i}" for i in range(cfg.rollout_engines)]


def workers_of(cfg: PPOConfig, role: str) -> int:
    """How many Ray workers (devices) hold `role`."""
    return {"actor": cfg.actor_workers, "critic": cfg.critic_workers}.get(role, 1)


def bundles(cfg: PPOConfig) -> list[list[str]]:
    """--colocate as device groups: the roles of each (a group has as many bundles as its largest role workers)."""
    names = role_names(cfg)
    if cfg.colocate == "all":
        return [names]
    pair = {"actor-ref": ("actor", "ref"), "critic-reward": ("critic", "reward")}.get(cfg.colocate, ())
    together = [n for n in names if n in pair]
    return ([together] if together else []) + [[n] for n in names if n not in pair]


def worker_name(cfg: PPOConfig, role: str, rank: int = 0) -> str:
    """The Ray actor name (`ray.get_actor`) of a role's worker `rank`: the run's output directory, the role, and the
    rank after a slash for all but the first."""
    return f"rlhfkit-ppo:{Path(cfg.output).resolve()}:{role}{f'/{rank}' if rank else ''}"


def sharing(cfg: PPOConfig, names: list[str], k: int) -> int:
    """How many workers share bundle k of the device group of roles `names` (they split its CPU and GPU)."""
    return sum(workers_of(cfg, n) > k for n in names)


def free_address() -> tuple[str, int]:
    """This node's address and a free port: where a role group's first worker serves its process group's store."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return ray().util.get_node_ip_address(), s.getsockname()[1]


class RoleWorker:
    """One of PPO's roles in a Ray worker process, built as `ppo_setup.build_roles` builds it in one process (the
    same seeds, so the same weights), on the device Ray gave the worker (a GPU, or the CPU). Worker `rank` of a
    role's `world` workers joins their process group at `store` (the first worker's address and port), as a
    torchrun process would, and holds the rows of its `Shard`."""

    def __init__(self, cfg: PPOConfig, role: str, cwd: str, threads: int, prompt_lengths: list[int], rank: int = 0,
                 world: int = 1, store: tuple[str, int] | None = None):
        from rlhfkit.algos.ppo import Learner, Shard

        os.chdir(cwd)  # the driver's relative paths (model, data, reward function files)
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in its workers
        if world > 1:  # torchrun's variables, which accelerate reads; Ray shows the worker its GPU alone: local 0
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR=store[0], MASTER_PORT=str(store[1]))
        self.cfg, self.role, self.rank = cfg, role, rank
        self.accelerator = accelerator_for(cfg.dtype)
        self.shard = Shard.of(self.accelerator, cfg.rollout_prompts, cfg.n_samples)
        self.precision = models.mixed_precision(cfg.dtype)
        torch.manual_seed(cfg.seed)
        tok = self.tok = models.load_tokenizer(cfg.policy)
        device = self.accelerator.device
        self.learner, self._rollout = None, (None, None)
        if role in ("actor", "critic"):
            if role == "actor":
                self.model = ppo_setup.build_actor(cfg, tok)
                net = torch.nn.ModuleDict({"actor": forward.SelectedLogits(self.model)})
                ptx = ppo_setup.load_ptx(cfg, tok)
            else:
                critic, self.critic_init = ppo_setup.build_critic(cfg, tok)
                net, ptx = torch.nn.ModuleDict({"critic": forward.ValueModel(critic)}), []
            net.to(device).eval()  # dropout off; gradients still flow
            self.learner = Learner.build(cfg, net, self.accelerator, tok.pad_token_id, ptx)
        elif role == "ref":
            self.model = ppo_setup.build_reference(cfg, tok, device, self.precision)
        elif role == "reward":
            self.reward_model, self.reward_fn = ppo_setup.build_reward(cfg, device, self.precision)
        else:  # a rollout engine, on a copy of the actor that `sync` keeps up to date
            self.model = ppo_setup.build_actor(cfg, tok).requires_grad_(False).to(device).eval()
            self.engine = ppo_setup.build_engine(cfg, self.model, tok, self.precision, prompt_lengths)

    def ready(self) -> str:
        return self.role

    # the rollout engines
    def weights(self) -> dict[str, torch.Tensor] | None:
        """The actor's weights (its adapter's and the base's with --lora), whole on the CPU, for the engines: the
        first worker's (sharded, every worker takes part in gathering them); None from the others."""
        whole = distributed.full_state_dict(self.learner.net["actor"], strip="lm.")  # None: not sharded
        if self.rank:
            return None
        return whole if whole is not None else {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def sync(self, weights: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        self.model.load_state_dict(weights)
        return time.perf_counter() - t0 + self.engine.sync(self.model)

    def generate(self, prompts, params: SamplingParams) -> Samples:
        samples = self.engine.generate(prompts, params)
        self.engine.sleep()
        return samples

    # the reward
    def score(self, row_prompts, texts, row_meta, groups) -> torch.Tensor:
        from rlhfkit.algos.ppo import reward_scores

        return reward_scores(self.cfg, self.reward_model, self.reward_fn, row_prompts, texts, row_meta, groups,
                             self.precision)

    # step 4's passes over this worker's rows: (b, R) and the seconds taken
    def logprobs(self, rollout: list, adapter_off: bool = False) -> tuple[torch.Tensor, float]:
        from rlhfkit.algos.ppo import logprob_pass

        t0 = time.perf_counter()
        model = self.learner.net["actor"] if self.learner is not None else self.model
        # --lora: the reference is the actor without its adapter
        with self.accelerator.autocast(), self.model.disable_adapter() if adapter_off else contextlib.nullcontext():
            out = logprob_pass(self.cfg, model, self.local(rollout))
        return out.cpu(), time.perf_counter() - t0

    def values(self, rollout: list) -> tuple[torch.Tensor, float]:
        from rlhfkit.algos.ppo import value_pass

        t0 = time.perf_counter()
        with self.accelerator.autocast():
            out = value_pass(self.cfg, self.learner.net["critic"], self.local(rollout))
        return out.cpu(), time.perf_counter() - t0

    # step 6
    def minibatch(self, rollout: list, mb_rows: torch.Tensor, n_tokens: float, beta: float, ptx_step: int):
        """The backward passes of this worker's rows of a minibatch; the statistics summed over the role's workers,
        the rows as indices into the whole batch."""
        from rlhfkit.algos.ppo import Minibatch

        shard = self.shard
        mb = self.learner.minibatch(self.local(rollout), mb_rows, n_tokens, beta, ptx_step, shard)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        stats = mb.stats.across(self.accelerator)
        return Minibatch(type(stats)(*map(cpu, stats)), mb.train_tokens, mb.rows + shard.first * shard.n,
                         cpu(mb.logprobs))

    def grad_norms(self) -> torch.Tensor:
        return self.learner.grad_norms()

    def step_with_norm(self, clip: float, total_norm: float | None) -> None:
        self.learner.step_with_norm(clip, total_norm)

    def lr_step(self) -> float:
        return self.learner.lr_step()

    def critic_init_of(self) -> str:
        return self.critic_init

    # checkpoints and the final save
    def write(self, directory: str) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        learner = self.learner
        checkpoint.write_trained(path, learner.engine, learner.optimizer, learner.scheduler, self.rank == 0)

    def read(self, directory: str) -> None:
        learner = self.learner
        checkpoint.read_trained(Path(directory), learner.engine, learner.optimizer, learner.scheduler)

    def save_final(self, out: str) -> None:
        whole = distributed.full_state_dict(self.learner.net["actor"], strip="lm.")  # every worker; None: unsharded
        if self.rank == 0:
            models.save_pretrained(self.model, self.tok, Path(out), merge=self.cfg.lora and self.cfg.merge,
                                   state_dict=whole)

    def local(self, ref: list) -> Rollout:
        """This worker's rows of the iteration's rollout (`Shard`; all of them for a role of one worker) on its
        device, from `[its object ref]` (in a list, so that Ray passes the ref rather than a fresh copy each call):
        fetched and moved once, then reused by every pass and minibatch of the iteration."""
        if self._rollout[0] != ref[0]:
            rollout, device, shard = ray().get(ref[0]), self.accelerator.device, self.shard
            if shard.world > 1:
                rollout = rollout.rows(torch.arange(shard.first * shard.n, (shard.first + shard.count) * shard.n))
            self._rollout = (ref[0], replace(rollout, **{k: v.to(device) for k, v in vars(rollout).items()
                                                         if isinstance(v, torch.Tensor)}))
        return self._rollout[1]


@dataclass
class RayRoles:
    """The roles as Ray actors: what the loop in `ppo.train` calls (the interface of `ppo.InProcess`). The driver
    is one process (`Shard` of 1): the rows it hands a role are the whole batch, which a role group's workers
    split."""

    cfg: PPOConfig
    workers: dict[str, list[Any]]  # role name -> its workers' Ray actor handles, in rank order
    placement: list[list[str]]  # the device groups' roles (`bundles`)
    monitors: dict
    accelerator: Any
    critic_init: str | None
    started_cluster: bool
    group: Any  # the placement group
    checkpointed: tuple = (None, None, None)  # the driver holds no model: the workers read their own files
    _rollout: tuple = field(default=(None, None))  # (the Rollout, [its object ref]): put once per iteration

    @classmethod
    def start(cls, cfg: PPOConfig, prompts: ppo_setup.PromptSet, accelerator) -> RayRoles:
        """Join (--ray-address) or start a Ray cluster, reserve the placement group, start every role's workers and
        wait until each is built."""
        rt = ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placement = bundles(cfg)
        sizes = [max(workers_of(cfg, r) for r in names) for names in placement]  # bundles of each device group
        started = not rt.is_initialized()
        if started:
            if cfg.ray_address:
                rt.init(address=cfg.ray_address, log_to_driver=True)
            else:  # one logical CPU per bundle: the roles take turns on the machine's cores
                rt.init(num_cpus=max(sum(sizes), os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
        gpus = rt.cluster_resources().get("GPU", 0) >= 1
        device = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        group = placement_group([dict(device) for _ in range(sum(sizes))], strategy="PACK")
        try:
            rt.get(group.ready(), timeout=300)
        except rt.exceptions.GetTimeoutError:
            raise UsageError(f"--backend ray: the cluster cannot hold {sum(sizes)} bundles of {device} "
                             f"(--colocate {cfg.colocate}: {placement}, {sizes} device(s) each); it has "
                             f"{rt.cluster_resources()}") from None
        on = lambda b: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b)  # noqa: E731
        # on a cluster this run started without GPUs every bundle is this machine's, and the workers of different
        # bundles compute at once: each gets its share of the cores (more threads than cores, and OpenMP's waits
        # spin against each other: benchmarks/RESULTS.md, "PPO in one process against --backend ray")
        threads = torch.get_num_threads()
        if started and not cfg.ray_address and not gpus:
            threads = max(1, threads // sum(sizes))
        remote = rt.remote(RoleWorker)
        workers: dict[str, list[Any]] = {}
        first = 0  # the device group's first bundle
        for names, size in zip(placement, sizes):
            for name in names:
                world = workers_of(cfg, name)
                store = rt.get(rt.remote(free_address).options(num_cpus=0.01, scheduling_strategy=on(first)).remote()
                               ) if world > 1 else None
                role = name.rstrip("0123456789") if name.startswith("rollout") else name
                workers[name] = [remote.options(
                    name=worker_name(cfg, name, k), namespace=NAMESPACE,
                    num_cpus=1 / sharing(cfg, names, k), num_gpus=1 / sharing(cfg, names, k) if gpus else 0,
                    scheduling_strategy=on(first + k),
                ).remote(cfg, role, os.getcwd(), threads, prompts.lengths, k, world, store)
                    for k in range(world)]
            first += size
        team = cls(cfg, workers, placement, ppo_setup.load_monitors(cfg, accelerator.device), accelerator, None,
                   started, group)
        team.get({name: [w.ready.remote() for w in ws] for name, ws in workers.items()}, "start")
        if "critic" in workers:
            team.critic_init = team.get({"critic": team.call("critic", "critic_init_of")})["critic"][0]
        shown = lambda n: f"{n}×{len(workers[n])}" if len(workers[n]) > 1 else n  # noqa: E731
        groups = f" ({cfg.sharding} in a group)" if max(sizes) > 1 else ""
        print(f"ray {rt.__version__}: {sum(map(len, workers.values()))} workers in {sum(sizes)} "
              f"{'GPU' if gpus else 'CPU'} bundle(s){groups}: "
              f"{' | '.join(' + '.join(map(shown, b)) for b in placement)}")
        return team

    def call(self, role: str, method: str, *args, **kwargs) -> list[Any]:
        """`method` on every worker of `role` at once (a group's collectives need all its members): the futures."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers[role]]

    def get(self, futures: dict[str, list[Any]], doing: str = "") -> dict[str, list[Any]]:
        """Each role's results (one per worker); a role whose worker died stops the run with one message naming it
        and the last checkpoint, and an error raised inside a worker is raised here as it was."""
        rt = ray()
        out = {}
        for name, each in futures.items():
            try:
                out[name] = rt.get(each)
            except rt.exceptions.RayActorError as e:
                self.close()
                if isinstance(getattr(e, "cause", None), rt.exceptions.RayTaskError) and \
                        isinstance(e.cause.cause, RlhfkitError):  # raised while the worker was built
                    raise e.cause.cause from None
                last = checkpoint.latest(Path(self.cfg.output) / "checkpoints")
                cause = str(e).strip().splitlines()[0][:200]
                raise TrainingError(
                    f"--backend ray: the {name} role's worker died{f' ({doing})' if doing else ''}: {cause}. The "
                    f"iteration it was in was not logged; last checkpoint: {last or 'none (--save-steps N saves them)'}"
                    f"{'; continue from it with --resume' if last else ''}") from None
            except rt.exceptions.RayTaskError as e:
                self.close()
                if isinstance(e.cause, RlhfkitError):
                    raise e.cause from None
                raise
        return out

    def in_turns(self, calls: dict[str, tuple[str, Any]], doing: str) -> dict[str, list[Any]]:
        """Make the calls {key: (role, fn() -> its workers' futures)}: roles that share a device group take turns,
        as veRL's colocated roles do, and roles on different device groups run side by side."""
        group = {role: g for g, names in enumerate(self.placement) for role in names}
        queues: dict[int, list[tuple[str, Any]]] = {}
        for key, (role, fn) in calls.items():
            queues.setdefault(group[role], []).append((key, fn))
        out: dict[str, list[Any]] = {}
        while any(queues.values()):
            wave = {key: fn() for key, fn in (q.pop(0) for q in queues.values() if q)}
            out |= self.get(wave, doing)
        return {key: out[key] for key in calls}

    @property
    def learners(self) -> list[str]:
        return [n for n in ("actor", "critic") if n in self.workers]

    @property
    def engines(self) -> list[str]:
        return [n for n in self.workers if n.startswith("rollout")]

    def put(self, rollout: Rollout) -> list:
        """[the rollout's object ref]: put into the object store once an iteration; each worker fetches it once
        (`RoleWorker.local`)."""
        if self._rollout[0] is not rollout:
            self._rollout = (rollout, [ray().put(rollout)])
        return self._rollout[1]

    def sync(self) -> float:
        t0 = time.perf_counter()
        # the first worker's weights go from the object store to the engines, not through the driver
        weights = self.call("actor", "weights")
        self.get({"actor": weights[1:], **{n: self.call(n, "sync", weights[0]) for n in self.engines}}, "weight sync")
        return time.perf_counter() - t0

    def generate(self, prompts, params: SamplingParams) -> Samples:
        per = len(prompts) // len(self.engines)
        calls = {n: (n, lambda k=k, n=n: self.call(n, "generate", prompts[k * per:(k + 1) * per], replace(
            params, first_prompt=params.first_prompt + k * per))) for k, n in enumerate(self.engines)}
        return concat([parts[0] for parts in self.in_turns(calls, "generate").values()])

    def reward(self, row_prompts, texts, row_meta, groups) -> torch.Tensor:
        return self.get({"reward": self.call("reward", "score", row_prompts, texts, row_meta, groups)}, "score")[
            "reward"][0]

    def passes(self, rollout: Rollout, timing: dict[str, float]) -> Rollout:
        """Step 4, the roles' passes side by side; a role group's workers each pass their rows."""
        ref, calls = self.put(rollout), {}
        if not rollout.on_policy:
            calls["actor"] = ("actor", lambda: self.call("actor", "logprobs", ref))
        calls["ref"] = ("ref", lambda: self.call("ref", "logprobs", ref)) if "ref" in self.workers else \
            ("actor", lambda: self.call("actor", "logprobs", ref, adapter_off=True))
        if "critic" in self.workers:
            calls["critic"] = ("critic", lambda: self.call("critic", "values", ref))
        done = self.in_turns(calls, "log-prob and value passes")
        device = self.accelerator.device
        out = {k: torch.cat([part[0] for part in parts]).to(device) for k, parts in done.items()}
        seconds = {k: max(part[1] for part in parts) for k, parts in done.items()}
        timing.update({"time/logprobs": seconds.get("actor", 0.0), "time/reference": seconds["ref"],
                       "time/values": seconds.get("critic", 0.0)})
        return replace(rollout, logprobs=out.get("actor"), ref_logprobs=out["ref"], values=out.get("critic"))

    def minibatch(self, rollout, mb_rows, n_tokens, beta, ptx_step, actor: bool = True):
        from rlhfkit.algos.ppo import Minibatch

        ref = self.put(rollout)
        roles = [n for n in self.learners if actor or n != "actor"]  # the critic alone in its warm-up
        parts = self.in_turns({n: (n, lambda n=n: self.call(n, "minibatch", ref, mb_rows, n_tokens, beta, ptx_step))
                               for n in roles}, "update")
        # each worker's rows, the actor's where it trains; the statistics are the role's (every worker has them)
        first = parts["actor"] if "actor" in parts else parts["critic"]
        stats = first[0].stats.merge(parts["critic"][0].stats) if {"actor", "critic"} <= set(parts) else first[0].stats
        device, logprobs = self.accelerator.device, [p.logprobs for p in first if p.logprobs is not None]
        return Minibatch(type(stats)(*(None if v is None else v.to(device) for v in stats)),
                         sum(p.train_tokens for p in first), torch.cat([p.rows for p in first]),
                         torch.cat(logprobs).to(device) if logprobs else None)

    def step(self, clip: float, skip) -> float | None:
        """One optimizer step of the actor and the critic, clipped by the norm of both roles' gradients."""
        # the actor's parameters' norms, then the critic's: the order of one process's parameters, hence its norm
        norms = self.get({n: self.call(n, "grad_norms") for n in self.learners}, "update")
        total = float(torch.linalg.vector_norm(torch.cat([norms[n][0] for n in self.learners])))
        applied = None if skip(total) else total
        self.in_turns({n: (n, lambda n=n: self.call(n, "step_with_norm", clip, applied)) for n in self.learners},
                      "update")
        return applied

    def lr_step(self) -> float:
        return self.get({n: self.call(n, "lr_step") for n in self.learners})["actor"][0]

    def restore(self, path: Path) -> None:
        self.get({n: self.call(n, "read", str(path / n)) for n in self.learners}, "resume")

    def save(self, root: Path, step: int, state: dict) -> None:
        def write(tmp: Path) -> None:
            self.get({n: self.call(n, "write", str(tmp / n)) for n in self.learners}, "checkpoint")

        checkpoint.save(root, step, None, None, None, state, self.accelerator, self.cfg.save_total_limit, self.cfg,
                        write=write)

    def finish(self, out: Path, tok, final: dict) -> None:
        rt = ray()
        self.get({"actor": self.call("actor", "save_final", str(out))}, "final save")
        write_run_json(out, self.cfg, "ppo", final, {
            "backend": "ray", "ray": rt.__version__, "placement": self.placement, "sharding": self.cfg.sharding,
            "workers": {n: len(ws) for n, ws in self.workers.items()}})
        self.close()

    def close(self) -> None:
        """Stop every worker, free the placement group (and stop the cluster this run started), after the run or on
        an error."""
        from ray.util.placement_group import remove_placement_group

        rt = ray()
        for ws in self.workers.values():
            for w in ws:
                rt.kill(w)
        remove_placement_group(self.group)
        if self.started_cluster:
            rt.shutdown()
