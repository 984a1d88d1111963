"""PPO's step 1 (algos/ppo.py): the checks of its options, its data (the prompts, PPO-ptx's rows) and its roles,
the models and functions the loop calls: actor, reference, critic, reward model and/or function, monitors and the
rollout engine. In one process they are plain objects, built here once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from rlhfkit import DataError, UsageError, distributed, forward, models
from rlhfkit.data import chat, formats, sources
from rlhfkit.reward_fn import call_reward_fn, load_reward_fn
from rlhfkit.reward_model import RewardModel, reward_model_dir
from rlhfkit.core import rl
from rlhfkit.rollout import Engine, engine_kind, make_engine
from rlhfkit.training import for_training

if TYPE_CHECKING:
    from rlhfkit.algos.ppo import PPOConfig

ADVANTAGES = ("gae", "grpo", "rloo", "reinforce++")
BACKENDS = ("local", "ray")


def check(cfg: PPOConfig) -> None:
    distributed.from_launcher(cfg)  # an accelerate config's sharding, checked here with the rest
    if cfg.sharding == "zero3":
        # the rollout's forwards differ in number between processes (sampling to EOS, shared prompts), and ZeRO-3
        # all-gathers in every forward, even inside deepspeed.zero.GatheredParameters: a process waits forever
        raise UsageError("ppo does not run with --sharding zero3 (its rollout runs a different number of forwards on "
                         "each process, which ZeRO-3 cannot gather for); use fsdp2, which shards the weights too, "
                         "or zero2")
    if cfg.shard_frozen and cfg.sharding != "fsdp2":
        raise UsageError("--shard-frozen shards with FSDP2: pass --sharding fsdp2")
    if cfg.advantage not in ADVANTAGES:
        raise UsageError(f"--advantage {cfg.advantage!r}: expected one of {', '.join(ADVANTAGES)}")
    if cfg.advantage in ("grpo", "rloo") and cfg.n_samples < 2:
        raise UsageError(f"--advantage {cfg.advantage} compares a prompt's samples: set --n-samples ≥ 2")
    if not cfg.reward_model and not cfg.reward_fn:
        raise UsageError("give --reward-model, --reward-fn or both")
    if cfg.critic_warmup and (cfg.advantage != "gae" or cfg.critic_warmup >= cfg.iterations):
        raise UsageError(f"--critic-warmup {cfg.critic_warmup}: the iterations that train the critic alone need "
                         f"--advantage gae and fewer than --iterations {cfg.iterations}")
    if cfg.critic_warmup and cfg.sharding == "zero2":
        raise UsageError("--critic-warmup with --sharding zero2: ZeRO-2 steps its flattened parameter groups whole, "
                         "so the actor's AdamW state would move while it waits; use ddp or fsdp2")
    if cfg.reward_model:
        reward_model_dir(cfg.reward_model)  # before the critic is built from it, or transformers tries the hub
    if cfg.missing_eos not in ("replace", "subtract", "none"):
        raise UsageError(f"--missing-eos {cfg.missing_eos!r}: expected replace, subtract or none")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise UsageError(f"--kl-estimator {cfg.kl_estimator!r}: expected k1 or k3")
    for spec in cfg.monitor:  # before any model loads
        sources.parse(spec, "--monitor", ("rm", "fn"))
    if cfg.rollout_correction not in ("auto", *rl.CORRECTIONS):
        raise UsageError(f"--rollout-correction {cfg.rollout_correction!r}: expected auto, "
                         f"{', '.join(rl.CORRECTIONS)}")
    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.backend == "ray":
        from rlhfkit.algos import ppo_ray

        ppo_ray.check(cfg)
    elif cfg.ray_address or cfg.colocate != "all" or (cfg.rollout_engines, cfg.actor_workers,
                                                       cfg.critic_workers) != (1, 1, 1):
        raise UsageError("--ray-address, --colocate, --rollout-engines, --actor-workers and --critic-workers place "
                         "the roles of --backend ray; add --backend ray")
    if engine_kind(cfg) == "hf" and cfg.rollout_correction not in ("auto", "none"):
        raise UsageError(f"--rollout-correction {cfg.rollout_correction} weights vLLM's samples: the hf engine "
                         "samples with the trainer's own model and numerics, so there is nothing to correct "
                         "(--engine vllm, or --rollout-correction none)")


class PromptSet(NamedTuple):
    messages: list[formats.Messages]  # the prompts
    metadata: list[dict]  # each prompt row's own columns (for --reward-fn)
    lengths: list[int]  # each prompt's tokens after the chat template, with the generation prompt


def load_prompts(cfg: PPOConfig, tok) -> PromptSet:
    """The prompts, tokenised once here. Prompts longer than --max-length tokens after the chat template are
    skipped and counted, as veRL's `filter_overlong_prompts` does: cutting a chat prompt would cut away the
    question or the assistant's header."""
    prompts, rows = formats.read(cfg.prompts, formats.to_prompt)
    lengths = [len(chat.encode_prompt(tok, p.messages)) for p in prompts]
    fits = [n <= cfg.max_length for n in lengths]
    kept = [i for i, ok in enumerate(fits) if ok]
    if len(kept) < len(rows):
        first = prompts[fits.index(False)].where
        if not kept:
            raise DataError(f"{cfg.prompts}: every prompt is longer than --max-length {cfg.max_length} tokens "
                            f"(the first: {first}); raise --max-length")
        print(f"data: {len(rows) - len(kept)} of {len(rows)} prompts skipped, longer than --max-length "
              f"{cfg.max_length} tokens (the first: {first})")
    return PromptSet([prompts[i].messages for i in kept], [rows[i].data for i in kept], [lengths[i] for i in kept])


def load_ptx(cfg: PPOConfig, tok):
    if not cfg.ptx_data:
        return []
    convs, _ = formats.read(cfg.ptx_data, formats.to_conversation)
    return chat.tokenize_conversations(tok, convs, cfg.max_length)[0]


def load_monitors(cfg: PPOConfig, device) -> dict[str, Callable]:
    """NAME -> fn(prompts, responses, metadata, groups) -> (N,) scores, for --monitor (logged, never optimised);
    groups: each row's prompt (`Samples.prompt_index`)."""
    monitors: dict[str, Callable] = {}
    for spec in cfg.monitor:
        src = sources.parse(spec, "--monitor", ("rm", "fn"))
        if src.kind == "rm":
            rm = RewardModel.load(src.value, device, models.mixed_precision(cfg.dtype))
            name = "rm_" + Path(src.value).name

            def score(prompts, responses, metadata, groups, rm=rm):
                return rm.score(prompts, responses, cfg.rm_batch_size, cfg.max_length + cfg.max_new_tokens,
                                models.mixed_precision(cfg.dtype), groups=groups)[0]
        else:
            fn = load_reward_fn(spec, "--monitor")
            name = spec.rpartition(":")[2]

            def score(prompts, responses, metadata, groups, fn=fn, spec=spec):
                return call_reward_fn(fn, spec, prompts, responses, metadata, "--monitor")
        monitors[name] = score
    return monitors


def normalised_head(critic) -> None:
    """The RM's score normalisation (r − offset)·scale, which `RewardModel.score` applies to the rewards PPO sees,
    folded into a critic initialised from that RM: its head becomes a Linear with a bias, weight·scale and
    −offset·scale, so its first values are on the rewards' scale. (Read raw, an RM whose offset is 2 starts every
    value 2 above the returns, and GAE turns that into a pattern of advantages by position.)"""
    offset = getattr(critic.config, "rlhfkit_reward_offset", 0.0) or 0.0
    scale = getattr(critic.config, "rlhfkit_reward_scale", 1.0) or 1.0
    old = critic.score
    head = torch.nn.Linear(old.in_features, 1, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight * scale)
        head.bias.fill_((-offset * scale) + (float(old.bias) * scale if old.bias is not None else 0.0))
    critic.score = head


def build_critic(cfg: PPOConfig, tok):
    from transformers import AutoModelForSequenceClassification

    init = cfg.critic_init if cfg.critic_init != "auto" else ("rm" if cfg.reward_model else "zero")
    if init == "rm":
        if not cfg.reward_model:
            raise UsageError("--critic-init rm needs --reward-model")
        critic = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, num_labels=1)
        if critic.get_input_embeddings().weight.shape[0] < len(tok):
            raise UsageError("--critic-init rm: the reward model's vocabulary is smaller than the policy's; "
                             "use --critic-init zero")
        normalised_head(critic)
    elif init == "zero":
        src = models.resolve(cfg.policy)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if src.path is None:
                config = models.tiny_llama_config(len(tok), num_labels=1)
                critic = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
            else:
                critic = AutoModelForSequenceClassification.from_pretrained(src.path, num_labels=1)
        torch.nn.init.zeros_(critic.score.weight)
    else:
        raise UsageError(f"--critic-init {cfg.critic_init!r}: expected auto, rm or zero")
    # the critic trains what the actor trains: with --freeze-layers N its embeddings and first N blocks stay as
    # initialised (an RM trained with the same N has those of the SFT model), which halves its backward pass
    models.freeze_layers(critic, cfg.freeze_layers)
    return critic.float(), init


@dataclass
class Roles:
    """PPO's models, built once (step 1). `net` holds what trains: "actor" (`forward.SelectedLogits` around the
    policy) and, for GAE, "critic" (`forward.ValueModel`). `ref` is the frozen reference; None with --lora, where the
    reference is the actor with its adapter disabled. The engine samples with the actor's own weights (hf), or with
    a copy of them that each iteration refreshes (vllm)."""

    net: torch.nn.ModuleDict
    actor: Any  # the policy's causal LM (a peft model with --lora)
    ref: forward.SelectedLogits | None
    reward_model: RewardModel | None
    reward_fn: Callable | None
    monitors: dict[str, Callable]
    engine: Engine
    critic_init: str | None  # where the critic's weights came from (GAE)


def build_actor(cfg: PPOConfig, tok):
    """The policy's causal LM as the actor trains it (LoRA, frozen blocks, checkpointing: `for_training`); also the
    shape of a Ray rollout engine's copy, which the actor's weights then load into."""
    return for_training(models.load_causal_lm(cfg.policy, seed=cfg.seed, tokenizer=tok), cfg)


def build_reference(cfg: PPOConfig, tok, device, precision: str) -> forward.SelectedLogits:
    """The frozen reference: a copy of the policy, its blocks' Linear weights stored in `precision`
    (`models.inference_weights`)."""
    ref = forward.SelectedLogits(models.load_causal_lm(cfg.policy, seed=cfg.seed, tokenizer=tok)).requires_grad_(False)
    models.inference_weights(ref.lm, precision)
    return ref.to(device).eval()


def build_reward(cfg: PPOConfig, device, precision: str) -> tuple[RewardModel | None, Callable | None]:
    """--reward-model and --reward-fn, either of which may be absent."""
    return (RewardModel.load(cfg.reward_model, device, precision) if cfg.reward_model else None,
            load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None)


def build_engine(cfg: PPOConfig, model, tok, precision: str, prompt_lengths: list[int]) -> Engine:
    """The rollout engine on `model`, checked against the longest prompt and response before any work."""
    engine = make_engine(cfg, model, tok, cfg.generate_batch_size, precision, seed=cfg.seed)
    engine.check_fits(prompt_lengths, cfg.max_new_tokens)
    return engine


def build_roles(cfg: PPOConfig, tok, prompts: PromptSet, device, precision: str, frozen_sharded: bool = False
                ) -> Roles:
    """`frozen_sharded` (--shard-frozen with several processes): the reference and reward model keep fp32 weights
    (`models.inference_weights` would store their blocks' Linear weights in bf16 beside fp32 norms, and FSDP2 shards
    only uniform dtypes); 1/N of 4 bytes is no more than 2 bytes whole from 2 processes on."""
    frozen_precision = "no" if frozen_sharded else precision
    actor = build_actor(cfg, tok)
    net = torch.nn.ModuleDict({"actor": forward.SelectedLogits(actor)})
    ref = None if cfg.lora else build_reference(cfg, tok, device, frozen_precision)
    critic_init = None
    if cfg.advantage == "gae":
        critic, critic_init = build_critic(cfg, tok)
        net["critic"] = forward.ValueModel(critic)
    net.to(device).eval()  # dropout off everywhere; gradients still flow
    reward_model, reward_fn = build_reward(cfg, device, frozen_precision)
    engine = build_engine(cfg, actor, tok, precision, prompts.lengths)
    return Roles(net, actor, ref, reward_model, reward_fn, load_monitors(cfg, device), engine, critic_init)
