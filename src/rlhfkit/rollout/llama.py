"""Sampling forward passes for Llama-family models (SmolLM2, tiny-llama): fused weights and a slot KV cache.

`HFEngine` drives the same continuous-batching loop over two running batches: `hf.HFBatch` calls the transformers
model with its DynamicCache; `LlamaBatch` here runs the same decoder maths as a plain function of the weights.
Why a second one: a profile of `benchmarks/generate_bench.py` (smollm2-135m, batch 64, bf16) put 46% of the time
in the matmuls, already at the machine's bf16 peak, and most of the rest in the transformers call around them:
the DynamicCache growing by `torch.cat` at every step (9%), and hundreds of small modules, masks and casts
per token. Here:
  * the KV cache is allocated once per `generate` call, (slots, kv heads, capacity, head dim) per layer; a row's
    keys sit in columns [0, its length), so a decode step writes one column per row instead of copying the cache;
  * the prompts' common start (the chat template's system prompt: 24 of SmolLM2's ~40 prompt tokens on the
    built-in task) runs once and is copied into every slot; each prompt's prefill runs only its own suffix;
  * q/k/v and gate/up are fused into one matmul each, and in a decode step the 9 query heads of SmolLM2 attend as
    3 groups of 3 queries on their key/value head (no repeated keys, no GQA expansion).
Positions are a row's column indices (no padding inside a row), as the HF path's "real tokens only" positions.

Same maths as transformers' LlamaForCausalLM (RMSNorm in fp32, rotate-half RoPE from the model's own rotary
module, SiLU-gated MLP, tied or untied head): tests/rollout/test_llama.py checks logits against the model's
forward in fp32 and bf16, and tests/rollout/test_engine.py runs every engine test on both batches.
Supported: `unsupported(model)` is None (model type "llama", SiLU, no biases); anything else uses `HFBatch`.
A peft model is merged into a copy first (the trained model is not touched).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from rlhfkit import models
from rlhfkit.data.collate import pad_right
from rlhfkit.rollout import distinct_prompts


def unsupported(model) -> str | None:
    """Why `LlamaBatch` cannot run `model` (None when it can)."""
    base = models.base_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', type(base).__name__)!r} is not llama"
    if config.hidden_act != "silu" or config.attention_bias or config.mlp_bias:
        return "only SiLU MLPs without biases"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "llama3"):
        return f"RoPE type {rope.get('rope_type')!r} (only ones that do not depend on the sequence length)"
    return None


def projection(linear) -> torch.Tensor:
    """A projection's weight (out, in); for a peft LoRA layer, with its active adapters added: W + scale·B·A, the
    sum peft's merge writes into the model, here on a copy (the model stays as it is; a sharded model cannot be
    deep-copied to merge)."""
    if not hasattr(linear, "get_delta_weight"):
        return linear.weight
    weight = linear.get_base_layer().weight
    if not linear.disable_adapters:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name)
    return weight


class LlamaWeights:
    """The decoder's weights in `dtype`, q/k/v and gate/up each fused into one matrix, LoRA adapters merged in
    (`projection`), made once per `generate` call (weights change between PPO iterations, not within a call). Fused,
    merged or cast weights are copies; the others (in the model's own dtype) share the model's storage, detached:
    nothing here writes to them."""

    def __init__(self, model, dtype: torch.dtype):
        model = models.base_model(model)
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.q_dim, self.kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim  # widths in fused qkv
        self.eps = config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
        self.layers = []
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=cast(layer.input_layernorm.weight), ln2=cast(layer.post_attention_layernorm.weight),
                qkv=cast(torch.cat([projection(att.q_proj), projection(att.k_proj), projection(att.v_proj)])),
                o=cast(projection(att.o_proj)),
                gate_up=cast(torch.cat([projection(mlp.gate_proj), projection(mlp.up_proj)])),
                down=cast(projection(mlp.down_proj))))
        self.embed = cast(model.model.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        self.head = self.embed if head is model.model.embed_tokens.weight else cast(head)
        self.norm = cast(model.model.norm.weight)
        self.dtype, self.device = dtype, self.embed.device

    def rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, head_dim) for positions 0..length-1, from the model's own rotary module."""
        x = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(x, torch.arange(length, device=self.device)[None])
        return cos[0], sin[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalised in fp32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (transformers' apply_rotary_pos_emb); cos/sin broadcast against x (…, head_dim)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def mlp(w: dict, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w["down"])


class LlamaBatch:
    """The running batch of `HFEngine`'s continuous batching on a Llama decoder: rows occupy slots 0..A-1 of a
    KV cache allocated once, each row's keys and values in columns [0, length) of its slot.

    prompts: every prompt token list of the `generate` call (their common start is run once, here);
    slots: the batch size; max_new_tokens: the most tokens a row samples (with the longest prompt, the capacity).
    The same interface as `hf.HFBatch`: `join`, `step`, `keep`, `can_join`.
    """

    def __init__(self, weights: LlamaWeights, prompts: list[list[int]], slots: int, max_new_tokens: int):
        from rlhfkit.fast.prefixes import shared_prefix_length

        self.w = weights
        self.prefix = prompts[0][:shared_prefix_length(prompts)]  # every prompt keeps ≥ 1 token of its own
        capacity = max(len(p) for p in prompts) + max_new_tokens
        shape = (len(weights.layers), slots, weights.kv_heads, capacity, weights.head_dim)
        # zeros, not empty: masked columns still enter attention as 0 · value, and uninitialised memory may be NaN
        self.keys = torch.zeros(shape, dtype=weights.dtype, device=weights.device)  # (layers, slots, Hkv, C, D)
        self.values = torch.zeros_like(self.keys)
        self.cos, self.sin = weights.rope_table(capacity)  # (C, D)
        self.length = torch.zeros(0, dtype=torch.long, device=weights.device)  # (A,) cached tokens per row
        if self.prefix:  # the common start, once, into every slot
            _, k, v = self._prefill(torch.tensor([self.prefix], device=weights.device), 0)
            for layer in range(len(k)):
                self.keys[layer, :, :, :len(self.prefix)] = k[layer]
                self.values[layer, :, :, :len(self.prefix)] = v[layer]

    def __len__(self) -> int:
        return len(self.length)

    def can_join(self) -> bool:
        return True

    @torch.no_grad()
    def join(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill N prompts into the next free slots (a prompt repeated for n samples runs once) -> (N, V) logits
        of each prompt's next token, in fp32."""
        start, device = len(self.prefix), self.w.device
        distinct, row_of = distinct_prompts(prompts, device)  # U prompts, (N,)
        ids, mask = pad_right([p[start:] for p in distinct], 0)  # (U, S): the suffixes, right-padded
        ids, width = ids.to(device), ids.shape[1]
        last = mask.sum(1).to(device) - 1  # (U,) each suffix's last token
        hidden, k, v = self._prefill(ids, start)  # (U, S, H); per layer (U, Hkv, S, D)
        slots = slice(len(self), len(self) + len(prompts))
        for layer in range(len(k)):  # padding columns are written too: beyond the row's length, never attended
            self.keys[layer, slots, :, start:start + width] = k[layer][row_of]
            self.values[layer, slots, :, start:start + width] = v[layer][row_of]
        self.length = torch.cat([self.length, start + last[row_of] + 1])
        return self._logits(hidden[torch.arange(len(distinct), device=device), last])[row_of]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed each row's new token (A,) at position `length` -> (A, V) fp32 logits of the token after it."""
        w, rows = self.w, len(self)
        token = token.to(w.device)
        # (A,) the column each row writes; a finished row waiting to leave is fed padding past its last token,
        # which may reach the capacity: it rewrites its last column, which nothing reads any more
        at = self.length.clamp(max=self.keys.shape[3] - 1)
        groups = w.heads // w.kv_heads
        cos, sin = self.cos[at][:, None], self.sin[at][:, None]  # (A, 1, D)
        width = int(at.max()) + 1
        visible = (torch.arange(width, device=at.device) <= at[:, None])[:, None, None]  # (A, 1, 1, W)
        row = torch.arange(rows, device=at.device)
        x = w.embed[token]  # (A, H)
        q_dim, kv_dim = w.q_dim, w.kv_dim
        for layer, p in enumerate(w.layers):
            qkv = F.linear(rms_norm(x, p["ln1"], w.eps), p["qkv"])  # (A, (Hq + 2 Hkv) D)
            q = rotate(qkv[:, :q_dim].view(rows, w.heads, w.head_dim), cos, sin)
            k = rotate(qkv[:, q_dim:q_dim + kv_dim].view(rows, w.kv_heads, w.head_dim), cos, sin)
            self.keys[layer, row, :, at] = k  # (A, Hkv, D) into column `at` of each row's slot
            self.values[layer, row, :, at] = qkv[:, q_dim + kv_dim:].view(rows, w.kv_heads, w.head_dim)
            # the query heads of a key/value head attend together: (A, Hkv, groups, D) on (A, Hkv, W, D)
            out = F.scaled_dot_product_attention(
                q.view(rows, w.kv_heads, groups, w.head_dim), self.keys[layer, :rows, :, :width],
                self.values[layer, :rows, :, :width], attn_mask=visible)
            x = x + F.linear(out.reshape(rows, q_dim), p["o"])
            x = x + mlp(p, rms_norm(x, p["ln2"], w.eps))
        self.length = at + 1
        return self._logits(x)

    def keep(self, rows: torch.Tensor) -> None:
        """Only rows `rows` (A',) stay, in slots 0..A'-1 in that order; only rows that change slot are copied."""
        rows = rows.to(self.length.device)
        to = (rows != torch.arange(len(rows), device=rows.device)).nonzero().squeeze(1)  # slots that get a new row
        if len(to):  # the sources are slots ≥ A' (`hf.fill_holes`) or any others: gathered before written
            width = int(self.length[rows[to]].max())
            self.keys[:, to, :, :width] = self.keys[:, rows[to], :, :width]
            self.values[:, to, :, :width] = self.values[:, rows[to], :, :width]
        self.length = self.length[rows]

    def _prefill(self, ids: torch.Tensor, start: int):
        """Hidden states (U, S, H) and per-layer keys and values (U, Hkv, S, D) of tokens `ids` (U, S) at positions
        start..start+S-1, each row after the common prefix (columns [0, start) of the slots; `start` is 0 or
        len(self.prefix)). Causal: a row's right padding is never seen by its real tokens."""
        w = self.w
        rows, width = ids.shape
        cos, sin = self.cos[start:start + width], self.sin[start:start + width]  # (S, D)
        # query i sees the prefix and suffix tokens 0..i: (S, start + S)
        visible = torch.ones(width, start + width, dtype=torch.bool, device=ids.device).tril(start)
        x = w.embed[ids]  # (U, S, H)
        q_dim, kv_dim = w.q_dim, w.kv_dim
        heads = lambda t, n: t.view(rows, width, n, w.head_dim).transpose(1, 2)  # noqa: E731  (U, n, S, D)
        keys, values = [], []
        for layer, p in enumerate(w.layers):
            qkv = F.linear(rms_norm(x, p["ln1"], w.eps), p["qkv"])  # (U, S, (Hq + 2 Hkv) D)
            q = rotate(heads(qkv[..., :q_dim], w.heads), cos, sin)
            k = rotate(heads(qkv[..., q_dim:q_dim + kv_dim], w.kv_heads), cos, sin)
            v = heads(qkv[..., q_dim + kv_dim:], w.kv_heads)
            keys.append(k)
            values.append(v)
            if start:
                cached = lambda c: c[layer, :1, :, :start].expand(rows, -1, -1, -1)  # noqa: E731
                k, v = torch.cat([cached(self.keys), k], dim=2), torch.cat([cached(self.values), v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)  # (U, Hq, S, D)
            x = x + F.linear(out.transpose(1, 2).reshape(rows, width, q_dim), p["o"])
            x = x + mlp(p, rms_norm(x, p["ln2"], w.eps))
        return x, keys, values

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.w.norm, self.w.eps), self.w.head).float()
