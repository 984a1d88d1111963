"""Shared helpers for rlhfkit benchmarks: matmul peak, model FLOPs and machine description.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, "PaLM", Appendix B) is the model FLOPs a training step
needs, divided by its time, divided by the peak FLOP/s of the hardware. We have no trustworthy datasheet peak
for a shared cloud CPU (core count, turbo and AMX availability vary by host), so the peak is *measured*: the
best sustained FLOP/s of a large square torch.matmul in the compute dtype, on the same machine, in the same
process. MFU against a measured matmul peak reads "how close to the best dense matmul this box can do".
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

from rlhfkit.tracking import matmul_peak

__all__ = ["machine_info", "matmul_peak", "model_flops_per_token", "non_embedding_params"]


def non_embedding_params(config: Any) -> int:
    """Parameters of a Llama-style decoder (attention + gated MLP + RMSNorms), without embeddings or lm_head.

    Per layer: q_proj h·(n_h·d), k_proj and v_proj h·(n_kv·d) each, o_proj (n_h·d)·h, gate/up/down 3·h·i,
    two RMSNorms 2·h (+ biases when attention_bias / mlp_bias); plus the final norm h.
    """
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n_h = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_h
    d = getattr(config, "head_dim", None) or h // n_h
    attn = h * n_h * d + 2 * h * n_kv * d + n_h * d * h
    if getattr(config, "attention_bias", False):
        attn += n_h * d + 2 * n_kv * d + h
    mlp = 3 * h * i
    if getattr(config, "mlp_bias", False):
        mlp += 2 * i + h
    return L * (attn + mlp + 2 * h) + h


def model_flops_per_token(config: Any, seq_len: int, lm_head_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style:

        6·N  +  12·L·(n_h·d)·T  +  6·h·V·f

    - 6·N: every non-embedding weight does one multiply-add (2 FLOPs) per token forward and two backward
      (input gradient and weight gradient); N from `non_embedding_params`.
    - 12·L·(n_h·d)·T: attention scores Q·Kᵀ and the weighted sum of V, 2·2·T·(n_h·d) FLOPs per token per
      layer forward, ×3 with backward; T = seq_len. As in PaLM, the causal mask is not credited (no halving).
      n_h·d equals hidden_size for Llama/SmolLM2.
    - 6·h·V·f: the lm_head matmul. It is a real matmul, so it counts, but only once even when its weight is
      tied to the input embeddings (SmolLM2): the embedding lookup is a gather, not a matmul. `f` is the
      fraction of positions whose logits are actually computed: rlhfkit's `SelectedLogits` projects only the
      trained positions, so crediting the full vocabulary projection at every token would inflate MFU.
    Norms, activations, rotary embeddings, softmax and the loss are left out (small, and not matmuls).
    """
    n_h = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // n_h
    attention = 12 * config.num_hidden_layers * n_h * d * seq_len
    lm_head = 6 * config.hidden_size * config.vocab_size * lm_head_fraction
    return 6 * non_embedding_params(config) + attention + lm_head


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = set(text.split())
    # the ones that decide which bf16/fp32 matmul kernels oneDNN can use
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU (or GPU), cores, threads and library versions."""
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        # cores this process may run on (containers and taskset can allow fewer than os.cpu_count)
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_section(results_md: Path, name: str, title: str, command: str, machine: dict[str, Any], text: str) -> None:
    """RESULTS.md's section NAME between its `<!-- NAME:start -->` and `<!-- NAME:end -->` markers, replacing what
    was there (at the end of the file the first time): the title, the command, today's date and the machine
    (`machine_info`), then `text` (how it was run, and the table)."""
    m = machine
    body = (f"## {title}\n\n```bash\n{command}\n```\n\n{datetime.date.today().isoformat()}; machine: {m['cpu']} "
            f"({', '.join(m['cpu_flags'])}), {m['cores_usable']} usable cores, torch {m['torch']}. {text}")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text, section = results_md.read_text(), f"{start}\n{body}\n{end}"
    if start in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.write_text(text)
