"""Language-model maths on hidden states: logits only where they are needed, never a full (B, T, V) tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def summed_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of −log p(target) in fp32. logits (N, V), targets (N,) -> scalar."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sequence_logps(logits: Tensor, targets: Tensor, select: Tensor) -> Tensor:
    """Summed log π(y_t | x, y_<t) of each row's selected tokens: the sequence log-prob of the response.

    logits (N, V) at the N selected positions of select (B, T), row-major; targets (N,) -> (B,) fp32.
    """
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    rows = select.nonzero()[:, 0]  # (N,) row of each selected position, in the same row-major order
    return torch.zeros(select.shape[0], device=logits.device).index_add(0, rows, token_logps)
