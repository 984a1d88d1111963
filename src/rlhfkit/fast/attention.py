"""Attention kernels for the passes of training and scoring (see the functions' docstrings for the measurements)."""

from __future__ import annotations

import contextlib
import os

import torch


def _enabled_sdpa_kernels() -> list:
    """The SDPA kernels enabled now (`torch.nn.attention.sdpa_kernel` sets these flags, CPU included)."""
    from torch.nn.attention import SDPBackend

    flags = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
             SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
             SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled()}
    return [k for k, on in flags.items() if on]


@contextlib.contextmanager
def _recompute_attention(kernels: list, gqa: str | None):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(kernels), _environ(GQA_ENV, gqa):
        yield


MATH_ATTENTION_MAX_LEN = 128  # benchmarks/RESULTS.md, "Shared prompt prefixes and the attention kernel ..."


@contextlib.contextmanager
def training_attention(key_len: int, device: torch.device):
    """The SDPA kernel for a trainer's forwards: on the CPU at key length ≤ 128, the math kernel (its backward
    is plain matmuls, faster there than the CPU flash kernel's backward, which dominates an RM step on short
    sequences); otherwise whatever torch picks (flash: less memory and faster at 512). The choice depends
    on the length only, never on whether gradients are on, so a trainer's no-grad passes (reference and old
    log-probs) compute exactly what its training forward computes: DPO's h and PPO's first ratio stay exact.
    Evaluation, forward only, does not use it (`SelectedLogits(short_math_attention=False)`): the math forward
    alone is ~1.4× slower than flash there (benchmarks/RESULTS.md, "Shared prompt prefixes and the attention
    kernel for short sequences").
    Both kernels compute softmax(QKᵀ/√d)V: the same numbers up to rounding (tested). Always with `native_gqa`."""
    with native_gqa(device):
        if device.type != "cpu" or key_len > MATH_ATTENTION_MAX_LEN:
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield


def for_forward(key_len: int, device: torch.device, short_math_attention: bool):
    """The attention of one forward over keys of `key_len`: `training_attention` for a trainer's passes
    (`short_math_attention`), `native_gqa` alone for evaluation and scoring."""
    return training_attention(key_len, device) if short_math_attention else native_gqa(device)


GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa attention at every call


def native_gqa(device: torch.device):
    """Grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads) by SDPA itself (`enable_gqa`), not by
    transformers' `repeat_kv`, which copies every key and value 3 times per layer (a profile of RM scoring: 15% of
    its time in those copies). On the CPU, where transformers does it only when told (`GQA_ENV`): with a mask
    it would send CUDA to the math kernel. The forward gives the same bits (fp32 and bf16), the gradients the
    same up to rounding (the key/value heads' gradients are summed over their query heads in another order;
    tested); 20% faster RM scoring, 5% faster training steps (benchmarks/RESULTS.md, "Grouped-query attention inside
    SDPA"). Not around sampling's
    one-token decode steps, which transformers already runs on the key/value heads (`pack_gqa`, faster there)."""
    return _environ(GQA_ENV, "1") if device.type == "cpu" else contextlib.nullcontext()


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """os.environ[name] = value (None: unset) inside the block, restored after."""
    old = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
