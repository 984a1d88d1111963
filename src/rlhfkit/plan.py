"""`rlhfkit plan`: before renting GPUs, what fits on them and how long PPO takes. Arithmetic only: no GPU, no weights.

Roles: actor (trained policy), critic (trained value model; none for GRPO/RLOO), ref (frozen copy of the policy),
reward (frozen scalar-head model; none for a reward function), rollout (the sampling engine). `--colocate` groups roles
into pools of GPUs; the roles of a pool share each of its GPUs. GiB = 2³⁰ bytes. Every assumption, memory first:
- Parameters are counted from the architecture (embeddings, attention with GQA and biases, MLP, norms, lm_head unless
  tied); critic and reward swap the lm_head for a value head of `hidden` weights. A bare size (7b) is the known
  llama-family model within 30% of it, else a generic llama shape (hidden = 128 × layers, MLP 3.5 × hidden, 8 KV
  heads, Llama-3's vocabulary).
- Trained in full: mixed-precision AdamW, 16 bytes per parameter (Rajbhandari et al. 2020, ZeRO, §3): ZeRO keeps bf16
  weights 2 + bf16 gradients 2 + fp32 master weights and two moments 12; FSDP2 with bf16 compute (torchtitan, veRL)
  fp32 weights 4 + fp32 gradients 4 + moments 8. Over the role's pool zero1 shards the optimizer states, zero2 the
  gradients too, zero3 and fsdp2 the weights too; ddp (ZeRO-0) nothing. Frozen roles: bf16 weights, sharded with
  zero3/fsdp2 (OpenRLHF's ZeRO-3 reference, veRL's FSDP one), else whole.
- LoRA trains the actor only (the critic in full, as in DeepSpeed-Chat, veRL and TRL): a frozen bf16 base and rank-r
  adapters, r·(in + out) parameters on every linear layer of every block, at 16 bytes each.
- --offload optimizer: gradients and optimizer states in CPU memory (ZeRO-Offload, Ren et al. 2021; OpenRLHF's
  --adam_offload); all: the weights too. Their PCIe traffic is not in the time estimate.
- Weights and optimizer states stay on the GPU throughout (veRL without param_offload, OpenRLHF without
  --deepspeed_enable_sleep); gradients and activations exist only while their role runs, and roles sharing a GPU run
  one at a time: a pool's training phase = all roles' weights and optimizers + the largest gradients and activations.
- Activations of a micro-batch of b sequences of s = prompt + response tokens, width h, bf16: with gradient
  checkpointing each layer's input, 2·b·s·h bytes, plus one layer recomputed in full, 34·b·s·h; without, 34·b·s·h per
  layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1, less its
  5·a·s²·b attention term, which flash attention does not store; its 4h MLP is close to gated 3.5h ones); forward-only
  roles, one layer's. The actor and the reference also hold fp32 logits, b·s·vocab·4 bytes (large at 128k vocabs).
  zero3/fsdp2 (or offloaded weights) gather two blocks' bf16 weights at once (computing, prefetched; embeddings not).
- vllm preallocates gpu_memory_utilization × the GPU's memory (default: 0.9 on GPUs of its own, what the other roles
  leave on shared ones) for weights/TP, 1.5 GiB of activations and CUDA graphs, and the KV cache: 2 (K, V) · layers ·
  kv_heads · head_dim · 2 bytes per token, heads split over TP (replicated beyond kv_heads); an engine decodes at most
  256 sequences at once (vLLM's max_num_seqs). hf samples with the actor's own model (rlhfkit's hf engine,
  DeepSpeed-Chat's Hybrid Engine): no copy of the weights unless sharded, offloaded or TP > 1, which gather weights/TP;
  its KV cache takes the memory left. An engine sharing GPUs with other roles sleeps while they run (veRL; OpenRLHF
  --vllm_enable_sleep): a GPU's peak = max(training phase, generation phase = all weights and optimizers + engine).
- 1 GiB per process per GPU (CUDA context, NCCL buffers, allocator slack): one trainer process holds a pool's roles (as
  in veRL, DeepSpeed-Chat and rlhfkit; OpenRLHF's process per role costs ~0.5 GiB more each, not counted), a vLLM
  engine is another. A GPU's memory is the total nvidia-smi reports. Fits: every GPU's peak ≤ its memory.
Time of one iteration (synchronous: generate, score, train; one PPO epoch):
- Every prompt has max_length tokens and every response runs to max_new_tokens (DeepSpeed-Chat's benchmark fixes both;
  real responses stop earlier, so this bounds the work from above).
- Generation, per engine, its share of the sequences, `concurrent` at a time: prefill is compute-bound, 2·N FLOPs per
  prompt token; a decode step reads weights/TP and the batch's KV cache (average context prompt + response/2) at
  decode_efficiency × peak bandwidth, or is compute-bound at 2·N·batch FLOPs, whichever is slower.
- Scoring and training, T = sequences × (prompt + response) tokens: 2·N·T FLOPs per forward, 4·N·T per backward
  (2·N·T with LoRA: no weight gradients for the frozen base), 2·N·T more to recompute with gradient checkpointing
  (Kaplan et al. 2020's 6·N·T; attention scores, under 10% at s ≤ 4k for ≥ 7B models, left out). Actor: old log-probs
  forward + training; critic: values forward + training; ref and reward: one forward.
- FLOPs / (pool GPUs × peak dense bf16 × mfu); pools run at once, a pool's roles in turn. Communication (ZeRO, FSDP,
  tensor parallel) and stragglers are not counted: mfu absorbs them.
- Weight sync: none when the rollout shares the actor's GPUs (resharded in memory), else 2·N bytes at 25 GB/s (one
  200 Gb/s InfiniBand link; NVLink inside a node is faster).
- Peak dense bf16 TFLOP/s (no sparsity) and bandwidth: vendors' spec sheets, SXM parts; the A10G, sold only by AWS, has
  no NVIDIA sheet: Baseten's "NVIDIA A10 vs A10G for ML model inference".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rlhfkit import UsageError

GIB = 2**30
PROCESS_GIB = 1.0  # per process per GPU: CUDA context, NCCL buffers, allocator slack
VLLM_RESERVE_GIB = 1.5  # vLLM's profiled activations and CUDA graphs, inside its budget
VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs
SYNC_BYTES_PER_S = 25e9  # one 200 Gb/s InfiniBand link


@dataclass(frozen=True)
class Arch:
    """A decoder's shape: enough to count its parameters and its KV cache."""

    layers: int
    hidden: int
    intermediate: int  # MLP width (OPT: ffn_dim)
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # the lm_head is the embedding matrix
    family: str = "llama"  # llama: gated MLP, RMSNorm, RoPE, no biases; qwen2: + q/k/v biases; opt: see ARCHS
    head_dim: int = 0  # 0: hidden / heads
    embed_dim: int = 0  # OPT-350m: embeddings this wide, projected in and out of the blocks (0: hidden)
    positions: int = 0  # learned position embeddings (OPT: max_position_embeddings + 2)
    final_norm: bool = True

    def dims(self) -> tuple[int, int, int, int]:
        """(hidden, intermediate, query width, key/value width)."""
        hd = self.head_dim or self.hidden // self.heads
        return self.hidden, self.intermediate, self.heads * hd, self.kv_heads * hd

    def norm_params(self) -> int:
        return 2 * self.hidden if self.family == "opt" else self.hidden  # LayerNorm has a bias, RMSNorm none

    def layer_params(self) -> int:
        h, i, q, kv = self.dims()
        bias = {"opt": q + 2 * kv + h, "qwen2": q + 2 * kv}.get(self.family, 0)
        mlp = 2 * h * i + i + h if self.family == "opt" else 3 * h * i
        return 2 * h * q + 2 * h * kv + bias + mlp + 2 * self.norm_params()

    def params(self) -> int:
        h, e = self.hidden, self.embed_dim or self.hidden
        embed = self.vocab * e + self.positions * h + (2 * e * h if e != h else 0)
        return (embed + self.layers * self.layer_params() + (self.norm_params() if self.final_norm else 0)
                + (0 if self.tied else self.vocab * e))

    def lora_params(self, r: int) -> int:
        """r·(in + out) for every linear layer of every block."""
        h, i, q, kv = self.dims()
        return self.layers * r * (2 * (h + q) + 2 * (h + kv) + (2 if self.family == "opt" else 3) * (h + i))

    def kv_bytes(self, tp: int = 1) -> float:
        """KV-cache bytes per token on each GPU of a tensor-parallel group of `tp`, bf16."""
        return 2 * self.layers * self.dims()[3] * 2 / min(tp, self.kv_heads)


OPT = dict(family="opt", positions=2050, tied=True, vocab=50272)  # 2-matrix MLP, LayerNorm, biases everywhere
ARCHS = {  # from each model's config.json on the Hugging Face hub
    "smollm2-135m": Arch(30, 576, 1536, 9, 3, 49152, tied=True),
    "llama-3.2-1b": Arch(16, 2048, 8192, 32, 8, 128256, tied=True),
    "llama-3-8b": Arch(32, 4096, 14336, 32, 8, 128256, tied=False),
    "llama-2-13b": Arch(40, 5120, 13824, 40, 40, 32000, tied=False),
    "llama-3-70b": Arch(80, 8192, 28672, 64, 8, 128256, tied=False),
    "qwen2.5-7b": Arch(28, 3584, 18944, 28, 4, 152064, tied=False, family="qwen2"),  # Qwen2-7B: the same shape
    "opt-350m": Arch(24, 1024, 4096, 16, 16, embed_dim=512, final_norm=False, **OPT),  # post-LN: no final norm
    "opt-1.3b": Arch(24, 2048, 8192, 32, 32, **OPT),
    "opt-6.7b": Arch(32, 4096, 16384, 32, 32, **OPT),
    "opt-13b": Arch(40, 5120, 20480, 40, 40, **OPT),
    "opt-30b": Arch(48, 7168, 28672, 56, 56, **OPT),
    "opt-66b": Arch(64, 9216, 36864, 72, 72, **OPT),
}


@dataclass(frozen=True)
class GPU:
    """What the planner needs of a GPU type."""

    memory_gib: float  # total, as nvidia-smi reports it
    tflops: float  # dense bf16 tensor-core peak, TFLOP/s
    tb_s: float  # memory bandwidth, TB/s


GPUS = {  # datasheets: A100 SXM4, H100 SXM5, H200 SXM (141 GB), L40S (48 GB, ECC on), Ada (RTX 4090, fp32 accumulate)
    "a100-40g": GPU(40.0, 312, 1.555),
    "a100-80g": GPU(80.0, 312, 2.039),
    "h100-80g": GPU(79.6, 989, 3.35),  # 81559 MiB
    "h200": GPU(140.4, 989, 4.8),  # 143771 MiB
    "l40s": GPU(45.0, 362, 0.864),  # 46068 MiB
    "a10g": GPU(22.5, 70, 0.6),  # 23028 MiB; AWS only, figures from Baseten
    "rtx4090": GPU(24.0, 165, 1.008),
}


@dataclass
class PlanConfig:
    """rlhfkit plan: what fits on which GPUs, and how long PPO takes, before renting them (arithmetic, no GPU)."""

    policy: str = "llama-3-8b"
    """Policy (the actor; the reference is a copy): a known architecture (llama-3-8b, qwen2.5-7b, opt-13b, …), a size
    such as 7b or 70b, or a Hugging Face directory or config.json (read, never loaded)."""
    critic: str | None = None
    """Critic, the same kinds of value; default: the policy's (InstructGPT, OpenRLHF); none: critic-free (GRPO,
    RLOO)."""
    reward_model: str | None = None
    """Reward model, the same kinds of value; default: the policy's; none: a reward function, no model."""
    reference: bool = True
    """Keep a frozen reference policy for the KL penalty (false for KL-free runs)."""
    gpu: str = "a100-80g"
    """GPU type: a100-40g, a100-80g, h100-80g, h200, l40s, a10g or rtx4090."""
    gpus: int = 8
    """GPUs in all."""
    colocate: str = "all"
    """Which roles share GPUs: all, none (a pool each), or groups of actor, critic, ref, reward and rollout joined by
    '-' and separated by ',', e.g. actor-ref,critic-reward (OpenRLHF's --colocate_actor_ref and
    --colocate_critic_reward)."""
    actor_gpus: int | None = None
    """GPUs of the actor's pool. Pools without a count share the GPUs left in the ratio actor 2 : critic 2 : ref 1 :
    reward 1 : rollout 2 (OpenRLHF's 70B example: 8 : 8 : 4 : 4 : 8)."""
    critic_gpus: int | None = None
    """GPUs of the critic's pool."""
    ref_gpus: int | None = None
    """GPUs of the reference's pool."""
    reward_gpus: int | None = None
    """GPUs of the reward model's pool."""
    rollout_gpus: int | None = None
    """GPUs of the rollout engines' pool."""
    engine: str = "vllm"
    """Rollout engine: vllm (a copy of the weights in preallocated memory, asleep while roles train) or hf (samples
    with the actor's own model, like DeepSpeed-Chat's Hybrid Engine; always on the actor's GPUs)."""
    rollout_tp: int = 1
    """Tensor-parallel size of each rollout engine; engines = rollout GPUs / this."""
    gpu_memory_utilization: float | None = None
    """vLLM's share of each GPU's memory for its weights, activations and KV cache; default: 0.9 on GPUs of its own,
    what the other roles leave on shared ones (at most 0.9)."""
    sharding: str = "fsdp2"
    """How trained roles spread over their pool: ddp (ZeRO-0: a whole copy each), zero1 (optimizer states split),
    zero2 (gradients too), zero3 (weights too) or fsdp2 (like zero3, with fp32 weights and gradients)."""
    offload: str = "none"
    """none, optimizer (gradients and optimizer states in CPU memory: ZeRO-Offload, OpenRLHF's --adam_offload) or all
    (weights too)."""
    lora: bool = False
    """Train the actor as LoRA adapters on every linear layer over a frozen bf16 base (the critic trains in full)."""
    lora_r: int = 16
    """LoRA rank."""
    gradient_checkpointing: bool = True
    """Keep only each layer's input and recompute the rest in backward: far less memory, a third more compute."""
    max_length: int = 1024
    """Prompt tokens (every prompt is taken at this length)."""
    max_new_tokens: int = 1024
    """Response tokens (every response is taken to run to this length)."""
    rollout_prompts: int = 512
    """Prompts per iteration."""
    n_samples: int = 1
    """Responses per prompt: sequences per iteration = rollout_prompts × n_samples."""
    batch_size: int = 2
    """Sequences per forward and backward pass on each GPU (micro-batch)."""
    iterations: int = 100
    """PPO iterations (unless --tokens is given)."""
    tokens: int | None = None
    """Prompt + response tokens to train on in all; sets the iterations."""
    mfu: float = 0.3
    """Model-FLOPs utilisation of training and prefill: the share of peak bf16 FLOP/s they reach."""
    decode_efficiency: float = 0.5
    """Share of peak memory bandwidth that decoding reaches."""


def resolve_model(key: str, value: str) -> tuple[str, Arch]:
    """(what `value` was taken as, its architecture): a known name, a size such as 7b, or a directory / config.json."""
    flag = f"--{key.replace('_', '-')} {value}"
    if value.lower() in ARCHS:
        return value.lower(), ARCHS[value.lower()]
    path = Path(value) / "config.json" if Path(value).is_dir() else Path(value)
    if path.is_file():
        try:
            return str(path), arch_from_config(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{flag}: not a usable config.json ({type(e).__name__}: {e})") from None
    size = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", value.lower())
    if not size or float(size[1]) == 0:
        raise UsageError(f"{flag}: not a known architecture ({', '.join(ARCHS)}), a size such as 7b or 135m, or a "
                         "Hugging Face directory or config.json")
    n = float(size[1]) * (1e6 if size[2] == "m" else 1e9)
    distance = {k: abs(math.log(a.params() / n)) for k, a in ARCHS.items() if a.family != "opt"}
    best = min(distance, key=distance.__getitem__)
    if distance[best] < math.log(1.3):
        return best, ARCHS[best]
    return f"generic llama-shaped {value}", generic_llama(n)


def arch_from_config(c: dict) -> Arch:
    """The architecture a Hugging Face config.json describes: OPT, or any llama-shaped decoder."""
    if c.get("model_type") == "opt":
        e = c.get("word_embed_proj_dim", c["hidden_size"])
        return Arch(c["num_hidden_layers"], c["hidden_size"], c["ffn_dim"], c["num_attention_heads"],
                    c["num_attention_heads"], c["vocab_size"], c.get("tie_word_embeddings", True), "opt",
                    embed_dim=0 if e == c["hidden_size"] else e, positions=c["max_position_embeddings"] + 2,
                    final_norm=c.get("do_layer_norm_before", True))
    heads = c["num_attention_heads"]
    return Arch(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                c.get("num_key_value_heads") or heads, c["vocab_size"], c.get("tie_word_embeddings", False),
                "qwen2" if c.get("model_type") == "qwen2" else "llama", head_dim=c.get("head_dim") or 0)


def generic_llama(n: float) -> Arch:
    """The llama shape (hidden = 128 × layers, MLP 3.5 × hidden, 8 KV heads) with the parameter count nearest n."""
    shapes = [Arch(h // 128, h, 256 * round(3.5 * h / 256), h // 128, min(8, h // 128), 128256, tied=False)
              for h in range(256, 32769, 128)]
    return min(shapes, key=lambda a: abs(math.log(a.params() / n)))


@dataclass(frozen=True)
class Role:
    """One model of the PPO loop, as the planner sees it."""

    name: str  # actor, critic, ref or reward
    label: str  # the architecture it was taken as
    arch: Arch
    params: int  # N of its model
    trained: bool
    lora: int  # adapter parameters (0: trained in full, or frozen)
    logits: bool  # holds vocabulary logits (actor, ref); critic and reward have a scalar head


ROLE_SHARE = {"actor": 2, "critic": 2, "ref": 1, "reward": 1, "rollout": 2}


def make_roles(cfg: PlanConfig) -> dict[str, Role]:
    """actor, critic, ref and reward, those the config has, in that order."""
    label, pol = resolve_model("policy", cfg.policy)
    lora = pol.lora_params(cfg.lora_r) if cfg.lora else 0
    roles = {"actor": Role("actor", label, pol, pol.params(), True, lora, True)}
    for name, key, value in (("critic", "critic", cfg.critic), ("reward", "reward_model", cfg.reward_model)):
        if (value or "").lower() != "none":
            lab, a = resolve_model(key, value) if value else (label, pol)
            scalar_head = a.params() - (0 if a.tied else a.vocab * (a.embed_dim or a.hidden)) + a.hidden
            roles[name] = Role(name, f"{lab} + value head", a, scalar_head, name == "critic", 0, False)
    if cfg.reference:
        roles["ref"] = Role("ref", label, pol, pol.params(), False, 0, True)
    return dict(sorted(roles.items(), key=lambda kv: list(ROLE_SHARE).index(kv[0])))


def gpu_pools(cfg: PlanConfig, names: list[str]) -> list[tuple[list[str], int]]:
    """[(roles, GPUs)] from --colocate and the per-role GPU counts (see PlanConfig.actor_gpus for the default split)."""
    if cfg.colocate in ("all", "none"):
        groups = [list(names)] if cfg.colocate == "all" else []
    else:
        groups = [g.split("-") for g in cfg.colocate.split(",")]
        flat = [r for g in groups for r in g]
        if set(flat) - set(ROLE_SHARE) or len(flat) != len(set(flat)):
            raise UsageError(f"--colocate {cfg.colocate!r}: expected all, none, or groups of {', '.join(ROLE_SHARE)} "
                             "joined by '-' and separated by ',' (each role once), e.g. actor-ref,critic-reward")
        groups = [[r for r in g if r in names] for g in groups]
    if cfg.engine == "hf":  # hf samples with the actor's own model: the rollout lives where the actor does
        groups = [[r for r in g if r != "rollout"] + ["rollout"] * ("actor" in g) for g in groups]
        groups += [] if any("actor" in g for g in groups) else [["actor", "rollout"]]
    placed = {r for g in groups for r in g}
    groups = [g for g in groups if g] + [[r] for r in names if r not in placed]
    for role in ROLE_SHARE:
        count = getattr(cfg, f"{role}_gpus")
        if count is not None and role not in names:
            raise UsageError(f"--{role}-gpus {count}: there is no {role} in this plan")
    counts = []
    for g in groups:
        given = {getattr(cfg, f"{r}_gpus") for r in g} - {None}
        if len(given) > 1:
            raise UsageError(f"--colocate: {'-'.join(g)} share their GPUs, but were given {sorted(given)} GPUs")
        counts.append(given.pop() if given else None)
    free = [i for i, c in enumerate(counts) if c is None]
    left = cfg.gpus - sum(c for c in counts if c)
    if left < len(free) or (not free and left):
        raise UsageError(f"--gpus {cfg.gpus}: the per-role counts take {cfg.gpus - left}, leaving {left} for "
                         f"{len(free)} pools without a count ({', '.join('-'.join(groups[i]) for i in free)})")
    shares = {i: sum(ROLE_SHARE[r] for r in groups[i]) for i in free}
    weight = sum(shares.values())
    for k, i in enumerate(sorted(free, key=shares.__getitem__, reverse=True)):  # at least one GPU for each pool
        counts[i] = min(left - (len(free) - k - 1), max(1, round(left * shares[i] / weight)))
        left, weight = left - counts[i], weight - shares[i]
    return list(zip(groups, counts))


def role_memory(role: Role, n: int, cfg: PlanConfig) -> dict[str, float]:
    """Bytes on each of a role's n GPUs: weights and optimizer (always there), grads and activations (while it runs)."""
    shard_w = n if cfg.sharding in ("zero3", "fsdp2") else 1
    shard_g = n if cfg.sharding in ("zero2", "zero3", "fsdp2") else 1
    shard_o = 1 if cfg.sharding == "ddp" else n
    w, g, o = (4, 4, 8) if cfg.sharding == "fsdp2" else (2, 2, 12)  # bytes per trained parameter: 16 in all
    trained, frozen = (role.params, 0) if role.trained and not role.lora else (role.lora, role.params)
    on_gpu_w, on_gpu_o = cfg.offload != "all", cfg.offload == "none"
    a, b, s = role.arch, cfg.batch_size, cfg.max_length + cfg.max_new_tokens
    layer = 34 * b * s * a.hidden  # one layer's activations, Korthikanti et al. 2022 less the s² term
    if role.trained:
        acts = a.layers * 2 * b * s * a.hidden + layer if cfg.gradient_checkpointing else a.layers * layer
    else:
        acts = layer
    gathered = 2 * a.layer_params() * 2 if shard_w > 1 or not on_gpu_w else 0
    return {"weights": (frozen * 2 + trained * w) / shard_w * on_gpu_w,
            "grads": trained * g / shard_g * on_gpu_o,
            "optimizer": trained * o / shard_o * on_gpu_o,
            "activations": acts + (b * s * a.vocab * 4 if role.logits else 0) + gathered}


def rollout_memory(actor: Role, cfg: PlanConfig, gpu: GPU, n: int, room: float) -> dict[str, float]:
    """Per GPU of the rollout's pool: the engine's weights and KV cache (vLLM: its whole budget less the weights), and
    how many sequences an engine decodes at once. `room`: bytes the other roles leave on the GPU."""
    tp = cfg.rollout_tp
    per_engine = math.ceil(cfg.rollout_prompts * cfg.n_samples / (n // tp))
    seq_kv = actor.arch.kv_bytes(tp) * (cfg.max_length + cfg.max_new_tokens)
    shared = cfg.engine == "hf" and tp == 1 and cfg.sharding not in ("zero3", "fsdp2") and cfg.offload != "all"
    weights = 0.0 if shared else 2 * actor.params / tp
    if cfg.engine == "hf":
        concurrent = min(per_engine, int(max(0.0, room - weights) // seq_kv))
        return {"weights": weights, "kv": concurrent * seq_kv, "concurrent": concurrent, "utilization": None}
    capacity = gpu.memory_gib * GIB
    util = cfg.gpu_memory_utilization or math.floor(100 * min(0.9, max(0.0, room) / capacity)) / 100
    fit = int(max(0.0, util * capacity - weights - VLLM_RESERVE_GIB * GIB) // seq_kv)
    return {"weights": weights, "kv": max(0.0, util * capacity - weights), "utilization": util,
            "concurrent": min(per_engine, VLLM_MAX_SEQS, fit)}


def pool_memory(roles: list[Role], rollout: bool, n: int, cfg: PlanConfig, gpu: GPU, actor: Role) -> dict:
    """One pool's memory per GPU: each role's components, both phases, the peak, and whether it fits."""
    mem = {r.name: role_memory(r, n, cfg) for r in roles}
    resident = sum(m["weights"] + m["optimizer"] for m in mem.values())
    running = {k: m["grads"] + m["activations"] for k, m in mem.items()}
    largest = max(running, key=running.__getitem__, default=None)
    processes = bool(roles) + (rollout and cfg.engine == "vllm")
    capacity, overhead = gpu.memory_gib * GIB, PROCESS_GIB * GIB * processes
    out = {"roles": mem, "resident": resident, "train": resident + running.get(largest, 0.0), "largest": largest,
           "generate": 0.0, "engine": None, "processes": processes, "overhead": overhead}
    if rollout:
        out["engine"] = rollout_memory(actor, cfg, gpu, n, capacity - overhead - resident)
        out["generate"] = resident + out["engine"]["weights"] + out["engine"]["kv"]
    out["peak"] = max(out["train"], out["generate"]) + overhead
    out["fits"] = out["peak"] <= capacity and (not rollout or out["engine"]["concurrent"] >= 1)
    return out


def iteration_seconds(cfg: PlanConfig, gpu: GPU, roles: dict[str, Role], pools: list, mems: list) -> dict[str, float]:
    """Seconds of one PPO iteration: generate; score and train; sync the actor's weights to the engines."""
    p, r, seqs = cfg.max_length, cfg.max_new_tokens, cfg.rollout_prompts * cfg.n_samples
    peak, tp, actor = gpu.tflops * 1e12, cfg.rollout_tp, roles["actor"]
    # 1. generate: every engine decodes its share of the sequences, c at a time
    i = next(k for k, (names, _) in enumerate(pools) if "rollout" in names)
    n, c = pools[i][1], max(1, mems[i]["engine"]["concurrent"])
    rounds = math.ceil(math.ceil(seqs / (n // tp)) / c)
    step_bytes = 2 * actor.params / tp + c * (p + r / 2) * actor.arch.kv_bytes(tp)
    step = max(step_bytes / (gpu.tb_s * 1e12 * cfg.decode_efficiency), 2 * actor.params * c / (tp * peak * cfg.mfu))
    generate = rounds * (2 * actor.params * c * p / (tp * peak * cfg.mfu) + r * step)  # prefill, then r steps
    # 2. score and train: FLOPs per token of each role; pools at once, the roles of a pool in turn
    backward = {"actor": 2 if cfg.lora else 4, "critic": 4}
    recompute = 2 if cfg.gradient_checkpointing else 0
    flops = {k: (2 + (2 + recompute + backward[k] if k in backward else 0)) * role.params for k, role in roles.items()}
    train = max(sum(flops.get(k, 0) for k in names) * seqs * (p + r) / (n * peak * cfg.mfu) for names, n in pools)
    # 3. sync the actor's weights to the engines
    sync = 0.0 if "actor" in pools[i][0] else 2 * actor.params / SYNC_BYTES_PER_S
    return {"generate": generate, "train": train, "sync": sync}


def plan(cfg: PlanConfig) -> dict:
    """Print what fits where and how long PPO takes; return the same as a compact, JSON-able dict."""
    if cfg.gpu not in GPUS:
        raise UsageError(f"--gpu {cfg.gpu!r}: unknown; known: {', '.join(GPUS)}")
    choices = {"sharding": ("ddp", "zero1", "zero2", "zero3", "fsdp2"), "offload": ("none", "optimizer", "all"),
               "engine": ("vllm", "hf")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"--{key} {getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    gpu, roles = GPUS[cfg.gpu], make_roles(cfg)
    pools = gpu_pools(cfg, [*roles, "rollout"])
    for names, n in pools:
        if "rollout" in names and n % cfg.rollout_tp:
            raise UsageError(f"--rollout-tp {cfg.rollout_tp}: does not divide the rollout's {n} GPUs")
    mems = [pool_memory([roles[k] for k in names if k != "rollout"], "rollout" in names, n, cfg, gpu, roles["actor"])
            for names, n in pools]
    secs = iteration_seconds(cfg, gpu, roles, pools, mems)
    tokens = cfg.rollout_prompts * cfg.n_samples * (cfg.max_length + cfg.max_new_tokens)
    iterations = math.ceil(cfg.tokens / tokens) if cfg.tokens else cfg.iterations
    report(cfg, gpu, roles, pools, mems, secs, iterations)
    out_roles = {}
    for (names, n), m in zip(pools, mems):
        for k in names:
            own = m["engine"]["weights"] + m["engine"]["kv"] if k == "rollout" else sum(m["roles"][k].values())
            out_roles[k] = {"gpus": n, "gib_per_gpu": round(own / GIB, 1), "fits": m["fits"]}
            if k == "rollout":
                out_roles[k].update(concurrent=m["engine"]["concurrent"], utilization=m["engine"]["utilization"])
    hours = sum(secs.values()) / 3600
    return {"fits": all(m["fits"] for m in mems), "gpu": cfg.gpu, "gpus": cfg.gpus, "roles": out_roles,
            "pools": [{"roles": names, "gpus": n, "peak_gib": round(m["peak"] / GIB, 1), "fits": m["fits"]}
                      for (names, n), m in zip(pools, mems)],
            "seconds_per_iteration": {k: round(v, 1) for k, v in secs.items()},
            "hours_per_iteration": round(hours, 4), "iterations": iterations,
            "hours_total": round(hours * iterations, 2)}


def _row(name: str, *cells: float | None) -> str:
    return f"  {name:<22}" + "".join(" " * 8 if c is None else f"{c / GIB:8.1f}" for c in cells)


def report(cfg: PlanConfig, gpu: GPU, roles: dict[str, Role], pools: list, mems: list, secs: dict,
           iterations: int) -> None:
    """The human-readable table: models, memory per GPU of each pool, time per iteration."""
    print(f"rlhfkit plan: PPO on {cfg.gpus} × {cfg.gpu} ({gpu.memory_gib:g} GiB, {gpu.tflops:g} TFLOP/s bf16, "
          f"{gpu.tb_s:g} TB/s each)")
    for r in roles.values():
        how = (f"LoRA r={cfg.lora_r}: {r.lora / 1e6:.0f}M trained" if r.lora else "trained") if r.trained else "frozen"
        print(f"  {r.name:<7} {r.label:<32} {r.params / 1e9:6.2f}B  {how}")
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    print(f"  {cfg.sharding}, offload {cfg.offload}, gradient checkpointing {checkpointing}; micro-batch"
          f" {cfg.batch_size} × ({cfg.max_length} + {cfg.max_new_tokens}) tokens")
    print(f"\n  {'GiB per GPU':<22}" + "".join(f"{h:>8}" for h in ("weights", "grads", "optim", "activ", "engine")))
    first = 0
    for (names, n), m in zip(pools, mems):
        print(f"GPU{f's {first}-{first + n - 1}' if n > 1 else f' {first}'}: {', '.join(names)}")
        first += n
        for k, c in m["roles"].items():
            print(_row(k, c["weights"], c["grads"], c["optimizer"], c["activations"]))
        if e := m["engine"]:
            util = f", gpu_memory_utilization {e['utilization']:g}" if e["utilization"] else ""
            print(_row(f"rollout ({cfg.engine}, TP{cfg.rollout_tp})", e["weights"], None, None, None, e["kv"])
                  + f"  {e['concurrent']} sequences at once{util}")
        phases = [f"training {m['train'] / GIB:.1f} ({m['largest']} running)"] * bool(m["largest"])
        phases += [f"generation {m['generate'] / GIB:.1f}"] * bool(m["engine"])
        print(f"  {', '.join(phases)}; + {m['overhead'] / GIB:g} for {m['processes']} process"
              f"{'es' * (m['processes'] > 1)} = peak {m['peak'] / GIB:.1f} of {gpu.memory_gib:g}: "
              f"{'fits' if m['fits'] else 'DOES NOT FIT'}")
    it = sum(secs.values())
    print(f"\ntime per iteration: {cfg.rollout_prompts * cfg.n_samples} sequences, mfu {cfg.mfu:g}, decoding at "
          f"{cfg.decode_efficiency:g} of peak bandwidth")
    for k, v in secs.items():
        print(f"  {k:<9}{v:9.1f} s")
    print(f"  total    {it:9.1f} s = {it / 3600:.3f} h; × {iterations} iterations = {it * iterations / 3600:.1f} h")
    print("every assumption: the docstring of rlhfkit/plan.py")
