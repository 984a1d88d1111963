"""PPO's roles as Ray actors: `rlhfkit ppo --backend ray [--ray-address ADDR] [--colocate all|actor-ref|
critic-reward|none] [--rollout-engines K]`.

The driver (the `rlhfkit ppo` process) runs algos/ppo.py's numbered loop as it is; `RayRoles` is the loop's
interface to the roles, the same as `ppo.InProcess`, and each of its calls is a method of a Ray actor (`RoleWorker`)
that holds one role and runs ppo.py's own functions on it: the actor (a `ppo.Learner`: its log-prob pass, backward
passes and optimizer steps; the final save), the critic (another `ppo.Learner`), the reference, the reward model
and/or function, and K rollout engines (hf or vLLM), each sampling an equal share of an iteration's prompts. The
rollout batch goes to the workers through Ray's object store (`ray.put` once per iteration), the actor's weights to
the engines the same way after every update.

Placement (OpenRLHF's and veRL's design): one placement group whose bundles are device groups. --colocate all puts
every role in one bundle (veRL's default: they take turns on the same GPUs), actor-ref and critic-reward put those
pairs together (OpenRLHF's --colocate_actor_ref / --colocate_critic_reward) and the rest in bundles of their own,
none gives every role its own. A bundle is one GPU where the cluster has GPUs (its roles share it, num_gpus 1/k),
else one CPU; a local cluster (no --ray-address) is started with as many CPUs as there are bundles.

Departures from OpenRLHF and veRL, and why:
- A role is one Ray worker: a role spread over a data-parallel/FSDP2 group of workers is not built yet (torchrun
  and --sharding do that for the local backend, docs/distributed.md).
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

from rlhfkit import RlhfkitError, TrainingError, UsageError, checkpoint, forward, models
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
    if cfg.sharding != "ddp" or cfg.shard_frozen:
        raise UsageError(f"--backend ray runs each role as one Ray worker: --sharding {cfg.sharding}"
                         f"{' and --shard-frozen' if cfg.shard_frozen else ''} spread a role over the processes of "
                         "the local backend (torchrun); drop them, or use --backend local")


def role_names(cfg: PPOConfig) -> list[str]:
    """The workers of a run: actor, critic (GAE), ref (none with --lora: the actor with its adapter off), reward,
    and the rollout engines rollout0, rollout1, …"""
    names = ["actor", *(["critic"] if cfg.advantage == "gae" else []), *([] if cfg.lora else ["ref"]), "reward"]
    return names + [f"rollout{i}" for i in range(cfg.rollout_engines)]


def bundles(cfg: PPOConfig) -> list[list[str]]:
    """--colocate as device groups: the roles of each bundle of the placement group."""
    names = role_names(cfg)
    if cfg.colocate == "all":
        return [names]
    pair = {"actor-ref": ("actor", "ref"), "critic-reward": ("critic", "reward")}.get(cfg.colocate, ())
    together = [n for n in names if n in pair]
    return ([together] if together else []) + [[n] for n in names if n not in pair]


def worker_name(cfg: PPOConfig, role: str) -> str:
    """A role's Ray actor name (`ray.get_actor`): the run's output directory and the role."""
    return f"rlhfkit-ppo:{Path(cfg.output).resolve()}:{role}"


class RoleWorker:
    """One of PPO's roles in a Ray worker process, built as `ppo_setup.build_roles` builds it in one process (the
    same seeds, so the same weights), on the device Ray gave the worker (a GPU, or the CPU)."""

    def __init__(self, cfg: PPOConfig, role: str, cwd: str, threads: int, prompt_lengths: list[int]):
        from rlhfkit.algos.ppo import Learner

        os.chdir(cwd)  # the driver's relative paths (model, data, reward function files)
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in its workers
        self.cfg, self.role = cfg, role
        self.accelerator = accelerator_for(cfg.dtype)
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
    def weights(self) -> dict[str, torch.Tensor]:
        """The actor's weights (its adapter's and the base's with --lora), on the CPU, for the engines."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

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

    # step 4's passes: (B, R) and the seconds taken
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
        from rlhfkit.algos.ppo import Minibatch, Shard

        shard = Shard.of(self.accelerator, self.cfg.rollout_prompts, self.cfg.n_samples)
        mb = self.learner.minibatch(self.local(rollout), mb_rows, n_tokens, beta, ptx_step, shard)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return Minibatch(type(mb.stats)(*map(cpu, mb.stats)), mb.train_tokens, mb.rows, cpu(mb.logprobs))

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
        checkpoint.write_model(path, learner.net, learner.optimizer, learner.scheduler)

    def read(self, directory: str) -> None:
        learner = self.learner
        checkpoint.read_model(Path(directory), learner.net, learner.optimizer, learner.scheduler)

    def save_final(self, out: str) -> None:
        models.save_pretrained(self.model, self.tok, Path(out), merge=self.cfg.lora and self.cfg.merge)

    def local(self, ref: list) -> Rollout:
        """The iteration's rollout on this worker's device, from `[its object ref]` (in a list, so that Ray passes
        the ref rather than a fresh copy each call): fetched and moved once, then reused by every pass and minibatch
        of the iteration."""
        if self._rollout[0] != ref[0]:
            rollout, device = ray().get(ref[0]), self.accelerator.device
            self._rollout = (ref[0], replace(rollout, **{k: v.to(device) for k, v in vars(rollout).items()
                                                         if isinstance(v, torch.Tensor)}))
        return self._rollout[1]


@dataclass
class RayRoles:
    """The roles as Ray actors: what the loop in `ppo.train` calls (the interface of `ppo.InProcess`). The driver
    is one process (`Shard` of 1): the rows it hands a worker are the whole batch."""

    cfg: PPOConfig
    workers: dict[str, Any]  # role name -> Ray actor handle
    placement: list[list[str]]
    monitors: dict
    accelerator: Any
    critic_init: str | None
    started_cluster: bool
    group: Any  # the placement group
    checkpointed: tuple = (None, None, None)  # the driver holds no model: the workers read their own files
    _rollout: tuple = field(default=(None, None))  # (the Rollout, [its object ref]): put once per iteration

    @classmethod
    def start(cls, cfg: PPOConfig, prompts: ppo_setup.PromptSet, accelerator) -> RayRoles:
        """Join (--ray-address) or start a Ray cluster, reserve the placement group, start every role's worker and
        wait until each is built."""
        rt = ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placement = bundles(cfg)
        started = not rt.is_initialized()
        if started:
            if cfg.ray_address:
                rt.init(address=cfg.ray_address, log_to_driver=True)
            else:  # one logical CPU per bundle: the roles take turns on the machine's cores
                rt.init(num_cpus=max(len(placement), os.cpu_count() or 1), include_dashboard=False,
                        log_to_driver=True)
        gpus = rt.cluster_resources().get("GPU", 0) >= 1
        device = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        group = placement_group([dict(device) for _ in placement], strategy="PACK")
        try:
            rt.get(group.ready(), timeout=300)
        except rt.exceptions.GetTimeoutError:
            raise UsageError(f"--backend ray: the cluster cannot hold {len(placement)} bundles of {device} "
                             f"(--colocate {cfg.colocate}: {placement}); it has {rt.cluster_resources()}") from None
        remote = rt.remote(RoleWorker)
        workers = {}
        for b, names in enumerate(placement):
            share = 1.0 / len(names)
            for name in names:
                workers[name] = remote.options(
                    name=worker_name(cfg, name), namespace=NAMESPACE, num_cpus=share, num_gpus=share if gpus else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b),
                ).remote(cfg, name.rstrip("0123456789") if name.startswith("rollout") else name, os.getcwd(),
                         torch.get_num_threads(), prompts.lengths)
        team = cls(cfg, workers, placement, ppo_setup.load_monitors(cfg, accelerator.device), accelerator, None,
                   started, group)
        team.get({name: w.ready.remote() for name, w in workers.items()}, "start")
        if "critic" in workers:
            team.critic_init = team.get({"critic": workers["critic"].critic_init_of.remote()})["critic"]
        print(f"ray {rt.__version__}: {len(workers)} roles in {len(placement)} "
              f"{'GPU' if gpus else 'CPU'} bundle(s): {' | '.join(' + '.join(b) for b in placement)}")
        return team

    def get(self, futures: dict[str, Any], doing: str = "") -> dict[str, Any]:
        """Each role's result; a role whose worker died stops the run with one message naming it and the last
        checkpoint, and an error raised inside a worker is raised here as it was."""
        rt = ray()
        out = {}
        for name, future in futures.items():
            try:
                out[name] = rt.get(future)
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

    def in_turns(self, calls: dict[str, tuple[str, Any]], doing: str) -> dict[str, Any]:
        """Make the calls {key: (role, fn() -> its future)}: roles that share a bundle (a device) take turns, as
        veRL's colocated roles do, and roles on different bundles run side by side."""
        bundle = {role: b for b, names in enumerate(self.placement) for role in names}
        queues: dict[int, list[tuple[str, Any]]] = {}
        for key, (role, fn) in calls.items():
            queues.setdefault(bundle[role], []).append((key, fn))
        out: dict[str, Any] = {}
        while any(queues.values()):
            wave = {key: fn() for key, fn in (q.pop(0) for q in queues.values() if q)}
            out |= self.get(wave, doing)
        return {key: out[key] for key in calls}

    @property
    def learners(self) -> dict[str, Any]:
        return {n: self.workers[n] for n in ("actor", "critic") if n in self.workers}

    @property
    def engines(self) -> dict[str, Any]:
        return {n: w for n, w in self.workers.items() if n.startswith("rollout")}

    def put(self, rollout: Rollout) -> list:
        """[the rollout's object ref]: put into the object store once an iteration; each worker fetches it once
        (`RoleWorker.local`)."""
        if self._rollout[0] is not rollout:
            self._rollout = (rollout, [ray().put(rollout)])
        return self._rollout[1]

    def sync(self) -> float:
        weights = self.workers["actor"].weights.remote()  # the engines fetch it from the object store
        t0 = time.perf_counter()
        self.get({n: w.sync.remote(weights) for n, w in self.engines.items()}, "weight sync")
        return time.perf_counter() - t0

    def generate(self, prompts, params: SamplingParams) -> Samples:
        per = len(prompts) // len(self.engines)
        calls = {n: (n, lambda k=k, w=w: w.generate.remote(prompts[k * per:(k + 1) * per], replace(
            params, first_prompt=params.first_prompt + k * per))) for k, (n, w) in enumerate(self.engines.items())}
        return concat(list(self.in_turns(calls, "generate").values()))

    def reward(self, row_prompts, texts, row_meta, groups) -> torch.Tensor:
        return self.get({"reward": self.workers["reward"].score.remote(row_prompts, texts, row_meta, groups)},
                        "score")["reward"]

    def passes(self, rollout: Rollout, timing: dict[str, float]):
        """Step 4, the roles' passes side by side."""
        ref = self.put(rollout)
        w, calls = self.workers, {}
        if not rollout.on_policy:
            calls["actor"] = ("actor", lambda: w["actor"].logprobs.remote(ref))
        calls["ref"] = ("ref", lambda: w["ref"].logprobs.remote(ref)) if "ref" in w else \
            ("actor", lambda: w["actor"].logprobs.remote(ref, adapter_off=True))
        if "critic" in w:
            calls["critic"] = ("critic", lambda: w["critic"].values.remote(ref))
        done = self.in_turns(calls, "log-prob and value passes")
        device = self.accelerator.device
        out = {k: v[0].to(device) for k, v in done.items()}
        timing.update({"time/logprobs": done["actor"][1] if "actor" in done else 0.0,
                       "time/reference": done["ref"][1],
                       "time/values": done["critic"][1] if "critic" in done else 0.0})
        return out.get("actor"), out["ref"], out.get("critic")

    def minibatch(self, rollout, mb_rows, n_tokens, beta, ptx_step):
        ref = self.put(rollout)
        parts = self.in_turns({n: (n, lambda w=w: w.minibatch.remote(ref, mb_rows, n_tokens, beta, ptx_step))
                               for n, w in self.learners.items()}, "update")
        actor = parts["actor"]
        stats = actor.stats.merge(parts["critic"].stats) if "critic" in parts else actor.stats
        device = self.accelerator.device
        return actor._replace(stats=type(stats)(*(None if v is None else v.to(device) for v in stats)),
                              logprobs=None if actor.logprobs is None else actor.logprobs.to(device))

    def step(self, clip: float, skip) -> float | None:
        """One optimizer step of the actor and the critic, clipped by the norm of both roles' gradients."""
        # the actor's parameters' norms, then the critic's: the order of one process's parameters, hence its norm
        norms = self.get({n: w.grad_norms.remote() for n, w in self.learners.items()}, "update")
        total = float(torch.linalg.vector_norm(torch.cat(list(norms.values()))))
        applied = None if skip(total) else total
        self.in_turns({n: (n, lambda w=w: w.step_with_norm.remote(clip, applied)) for n, w in self.learners.items()},
                      "update")
        return applied

    def lr_step(self) -> float:
        return self.get({n: w.lr_step.remote() for n, w in self.learners.items()})["actor"]

    def restore(self, path: Path) -> None:
        self.get({n: w.read.remote(str(path / n)) for n, w in self.learners.items()}, "resume")

    def save(self, root: Path, step: int, state: dict) -> None:
        def write(tmp: Path) -> None:
            self.get({n: w.write.remote(str(tmp / n)) for n, w in self.learners.items()}, "checkpoint")

        checkpoint.save(root, step, None, None, None, state, self.accelerator, self.cfg.save_total_limit, self.cfg,
                        write=write)

    def finish(self, out: Path, tok, final: dict) -> None:
        rt = ray()
        self.get({"actor": self.workers["actor"].save_final.remote(str(out))}, "final save")
        write_run_json(out, self.cfg, "ppo", final, {"backend": "ray", "ray": rt.__version__,
                                                     "placement": self.placement})
        self.close()

    def close(self) -> None:
        """Stop every worker, free the placement group (and stop the cluster this run started), after the run or on
        an error."""
        from ray.util.placement_group import remove_placement_group

        rt = ray()
        for w in self.workers.values():
            rt.kill(w)
        remove_placement_group(self.group)
        if self.started_cluster:
            rt.shutdown()
