"""Language-model maths on hidden states: logits only where they are needed, never a full (B, T, V) tensor."""

from __future__ import annotations

import torch
from torch import Tensor


def shifted_selection(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions whose logit predicts a trained token, and those tokens.

    The logit at position p predicts token p+1, so the hidden state of p is selected when token p+1 is trained.
    input_ids, loss_mask: (B, T) -> select (B, T) bool with select[:, -1] False; targets (N,) long.
    """
    select = torch.zeros_like(loss_mask, dtype=torch.bool)
    select[:, :-1] = loss_mask[:, 1:].bool()
    return select, input_ids[:, 1:][loss_mask[:, 1:].bool()]


def token_logits(hidden: Tensor, lm_head: torch.nn.Module, select: Tensor) -> Tensor:
    """hidden (B, T, H), select (B, T) bool -> logits (N, V) at the N selected positions, row-major order."""
    return lm_head(hidden[select])


def real_columns(mask: Tensor) -> slice:
    """The columns of a (B, T) attention mask from the first to the last that holds a real token in some row: what
    a batch cut from a wider one (left-padded prompts, right-padded responses) still needs."""
    real = mask.bool().any(0)  # (T,)
    return slice(int(real.long().argmax()), len(real) - int(real.flip(0).long().argmax()))


def per_row_sums(values: Tensor, select: Tensor) -> Tensor:
    """Sum of each row's selected values: values (N,) in the row-major order of select (B, T) -> (B,) fp32. Of
    `target_logps`' values: each row's sequence log-prob, Σ log π(y_t | x, y_<t) over its response."""
    rows = select.nonzero()[:, 0]  # (N,) row of each selected position, in the same row-major order
    return torch.zeros(select.shape[0], device=values.device).index_add(0, rows, values.float())


class ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h Wᵀ)[target] for N positions, the (N, V) logits made `chunk` rows at a time, never all at once.

    Forward keeps only the hidden states, the weight, the targets and each row's log-sum-exp (N,); backward
    recomputes each chunk's logits and turns them into the gradient at once: d logp / d logits = onehot − softmax.
    Memory: one (chunk, V) block instead of the (N, V) logits, their fp32 copy, the log-softmax and its gradient
    (for SmolLM2's 49,152-way vocabulary and N = 2,048, about 2 GB). Cost: the head's forward matmul once more.
    Matmuls run in the hidden states' dtype (bf16 under autocast, as the plain lm_head would), softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        w = weight.to(hidden.dtype)  # (V, H)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        out = torch.empty(len(targets), dtype=acc, device=hidden.device)
        lse = torch.empty(len(targets), dtype=acc, device=hidden.device)
        for i in range(0, len(targets), chunk):
            logits = (hidden[i:i + chunk] @ w.T).to(acc)  # (C, V)
            lse[i:i + chunk] = torch.logsumexp(logits, dim=-1)
            out[i:i + chunk] = logits.gather(1, targets[i:i + chunk, None])[:, 0] - lse[i:i + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        want_weight = ctx.needs_input_grad[1]  # False for a frozen head (LoRA; --freeze-layers, tied embeddings)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_weight else None
        for i in range(0, len(targets), ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad[i:i + ctx.chunk, None]  # (C, H), (C, 1)
            # in place: every (C, V) temporary is a fresh allocation (page faults) on CPU
            d = (h @ w.T).to(lse.dtype).sub_(lse[i:i + ctx.chunk, None]).exp_().mul_(-g)  # −g·softmax, (C, V)
            d.scatter_add_(1, targets[i:i + ctx.chunk, None], g.to(d.dtype))  # + g·onehot
            d = d.to(hidden.dtype)
            grad_hidden[i:i + ctx.chunk] = d @ w
            if want_weight:
                grad_weight += d.T @ h  # accumulated in fp32 (at least) across chunks
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None


def target_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """log π(target) at N positions from the final hidden states (N, H) and the LM head's weight (V, H) -> (N,)
    fp32 (fp64 for fp64 input), with the head computed in chunks (`ChunkedTargetLogps`)."""
    if torch.is_autocast_enabled(hidden.device.type):  # the plain lm_head would run in the autocast dtype
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    return ChunkedTargetLogps.apply(hidden, weight, targets, chunk)
