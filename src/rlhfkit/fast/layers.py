"""Wrappers around each transformer block's forward: gradient checkpointing and torch.compile."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from rlhfkit.fast.attention import GQA_ENV, _enabled_sdpa_kernels, _recompute_attention, native_gqa


# The KV-cache keyword a transformer block is called with: `cache` from transformers 5.24 on, `past_key_values`
# before. A block given both uses `cache` and ignores the other, so a wrapper that clears one must clear both.
LAYER_CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def cache_arg() -> str:
    """The name of a transformers model's KV-cache argument and output field: `cache` from 5.24 on,
    `past_key_values` before (5.24 still takes the old name, with a deprecation warning)."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def checkpoint_layers(model) -> None:
    """Gradient checkpointing (Chen et al. 2016): each transformer block keeps only its input and recomputes its
    activations in the backward pass, so training memory holds one block's activations instead of all of them,
    for about one more forward pass of compute. TRL turns this on by default.

    Done here rather than by transformers' `gradient_checkpointing_enable`, which checkpoints only in train mode:
    DPO and PPO train in eval mode (dropout off). Non-reentrant checkpointing restores the autocast state and
    needs no input that requires grad, so frozen embeddings and LoRA work. Call before `apply_lora`.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.get_decoder().layers:
        def forward(*args, _forward=layer.forward, **kwargs):
            if torch.is_grad_enabled():  # no-grad passes (evaluation, reference, generation) keep nothing anyway
                # no KV cache: the recomputation would append to it a second time (a sequence-classification
                # model, the RM, makes one by default)
                kwargs.update({k: None for k in LAYER_CACHE_KWARGS if k in kwargs}, use_cache=False)
                # the recomputation runs in the backward, outside the forward's `training_attention` context:
                # give it the attention kernels (and grouped-query setting) of the forward, or it recomputes with
                # other ones
                kernels, gqa = _enabled_sdpa_kernels(), os.environ.get(GQA_ENV)
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs,
                                  context_fn=lambda: (contextlib.nullcontext(), _recompute_attention(kernels, gqa)))
            return _forward(*args, **kwargs)

        layer.forward = forward


def compile_layers(model) -> None:
    """torch.compile (Inductor) of each transformer block, for the passes that train (gradients on).

    A block's matmuls run as they do eagerly; what Inductor changes is the rest (RMSNorm, rotary embeddings,
    SiLU·up, residual adds, autocast's casts), which eagerly is a dozen memory-bound passes per block, and its
    backward partitioner recomputes such cheap elementwise results instead of keeping them. SmolLM2, 8 × 512
    tokens, bf16, this CPU: a training step 1.02–1.34× faster from run to run and peak RSS 8.9 → 5.1 GB
    (benchmarks/RESULTS.md, "Compiled transformer blocks").
    Costs about 40 s of compilation in a fresh process (Inductor's on-disk cache makes later ones a few seconds),
    once per precision and train/eval mode: the graph is compiled for any batch shape.

    Eager, as before, where compiling would not pay or would not hold: without gradients (evaluation, reference
    and old log-probs, sampling: one-token decode steps) and with a KV cache (`decode_on_prefixes`: the cache's
    per-layer index would compile each block separately). The compiled graph fixes its attention kernel when it
    is traced (the global SDPA flags are not guarded), so it is traced under torch's default choice with native
    grouped-query attention whatever `training_attention` asks: the same maths, not the same bits, as the
    eager path (tested equal to rounding).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    default_kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                       SDPBackend.CUDNN_ATTENTION]
    for layer in model.get_decoder().layers:
        # dynamic from the start: trainers' batches change length every step, and one dynamic graph compiles once
        # where a static first guess would compile twice
        def forward(*args, _eager=layer.forward, _compiled=torch.compile(layer.forward, dynamic=True), **kwargs):
            if not torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in LAYER_CACHE_KWARGS):
                return _eager(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            with sdpa_kernel(default_kernels), native_gqa(hidden.device):
                return _compiled(*args, **kwargs)

        layer.forward = forward
