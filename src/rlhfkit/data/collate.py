"""Batches for causal-LM training: right-padded, or packed without padding.

Packing puts whole examples side by side in one row (best-fit decreasing) with position ids restarting at
each example. With no attention mask, transformers reads the restarts as sequence boundaries and builds a
block-diagonal causal mask, so packed examples never attend to each other (checked in tests/data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.chat import TokenizedExample


@dataclass(frozen=True)
class LMBatch:
    """A causal-LM batch. B rows, T = longest row.

    input_ids:      (B, T) long, right-padded with the pad id
    loss_mask:      (B, T) bool, True where the token is predicted and trained (its logit sits at t-1)
    attention_mask: (B, T) long, 1 on real tokens; None for packed rows (boundaries come from position_ids)
    position_ids:   (B, T) long, restarting at 0 for each packed example; None when not packed
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


@dataclass(frozen=True)
class PackedRow:
    """Several examples laid end to end, shorter than the packing length."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    where: str  # of the first example, for error messages


def pack(examples: list[TokenizedExample], max_length: int) -> list[PackedRow]:
    """Best-fit decreasing bin packing of whole examples into rows of at most `max_length` tokens."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        fits = [b for b in range(len(bins)) if space[b] >= n]
        if fits:
            b = min(fits, key=lambda b: space[b])
            bins[b].append(i)
            space[b] -= n
        else:
            bins.append([i])
            space.append(max_length - n)
    rows = []
    for members in bins:
        ids, mask, pos = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex.input_ids
            # the first token of each example has no logit to learn it from inside this row
            mask += [0] + ex.loss_mask[1:]
            pos += list(range(len(ex.input_ids)))
        rows.append(PackedRow(ids, mask, pos, f"{examples[members[0]].where} (+{len(members) - 1} packed)"))
    return rows


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with pad_id to the longest, and the mask (1 on real tokens)."""
    return _padded(seqs, pad_id, left=False)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with pad_id to the longest, and the mask (1 on real tokens): prompts for sampling
    and shared prefixes, whose last tokens must line up."""
    return _padded(seqs, pad_id, left=True)


def _padded(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate(rows: list[TokenizedExample | PackedRow], pad_id: int) -> LMBatch:
    """Right-pad rows to the longest one."""
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    packed = isinstance(rows[0], PackedRow)
    attention_mask = None if packed else torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = torch.tensor(r.input_ids)
        loss_mask[b, :n] = torch.tensor(r.loss_mask, dtype=torch.bool)
        if packed:
            position_ids[b, :n] = torch.tensor(r.position_ids)
            # padding continues the last example's positions, so it opens no new sequence; it carries no loss
            position_ids[b, n:] = torch.arange(r.position_ids[-1] + 1, r.position_ids[-1] + 1 + T - n)
        else:
            attention_mask[b, :n] = 1
    return LMBatch(input_ids, loss_mask, attention_mask, position_ids)
