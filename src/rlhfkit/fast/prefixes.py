"""Shared prefixes: rows that start with the same tokens (a prompt's n samples, a pair's chosen and rejected) run
that start once into a KV cache and only their own suffixes on top of it."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from rlhfkit.fast.attention import for_forward
from rlhfkit.fast.layers import cache_arg


def shared_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest common start of `seqs`, less at least one token so every sequence keeps a suffix."""
    n = min(len(s) for s in seqs) - 1
    for k, tokens in enumerate(zip(*seqs)):
        if k == n or any(t != tokens[0] for t in tokens):
            return k
    return n


class Prefix(NamedTuple):
    """Shared prefixes that rows run on instead of repeating them: row r is prefix row_of[r] followed by its own
    tokens (the batch's input_ids are then the suffixes). G prefixes, B rows.

    ids:    (G, P) long, LEFT-padded
    mask:   (G, P) long, 1 on real tokens
    row_of: (B,) long, the prefix of each row
    """

    ids: torch.Tensor
    mask: torch.Tensor
    row_of: torch.Tensor

    def to(self, device) -> Prefix:
        return Prefix(self.ids.to(device), self.mask.to(device), self.row_of.to(device))


def decode(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
           prefix: Prefix | None = None, short_math_attention: bool = True) -> torch.Tensor:
    """Last hidden states (B, T, H) of a trainer's forward: whole rows, or with `prefix` the rows' suffixes on
    shared prefixes (`decode_on_prefixes`; position_ids unused), under `training_attention` unless
    `short_math_attention` is off (then `native_gqa` only)."""
    key_len = input_ids.shape[1] + (0 if prefix is None else prefix.ids.shape[1])
    with for_forward(key_len, input_ids.device, short_math_attention):
        if prefix is None:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        return decode_on_prefixes(decoder, *prefix, input_ids, attention_mask)


def decode_on_prefixes(decoder, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, row_of: torch.Tensor,
                       suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, cache=None) -> torch.Tensor:
    """Last hidden states (R, S, H) of the suffixes of the sequences prefix[row_of[r]] + suffix[r], each prefix run
    once: G prefixes (G, P), LEFT-padded, run into a KV cache, the cache is copied to the R rows that share them,
    and the right-padded suffixes (R, S) run on top of it. What a forward over the R whole sequences gives at
    their suffix positions, up to float rounding (tested in the RM and DPO tests); gradients flow through the
    copied cache into the prefix's forward. Positions count real tokens only, so padding shifts nothing.
    `cache`: the prefixes' `prefix_cache`, already run (and left as it is), when several batches of suffixes
    share them.
    """
    device = prefix_ids.device
    rows = select_rows(cache if cache is not None else prefix_cache(decoder, prefix_ids, prefix_mask), row_of)
    mask = torch.cat([prefix_mask[row_of], suffix_mask], dim=1)  # (R, P + S)
    positions = prefix_mask.sum(1)[row_of, None] + torch.arange(suffix_ids.shape[1], device=device)  # (R, S)
    return decoder(input_ids=suffix_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_arg(): rows}).last_hidden_state


def prefix_cache(decoder, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor):
    """The KV cache of G left-padded prefixes (G, P), for `decode_on_prefixes`."""
    out = decoder(input_ids=prefix_ids, attention_mask=prefix_mask,
                  position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    cache = getattr(out, cache_arg())
    if cache is None or cache.get_seq_length() != prefix_ids.shape[1]:
        # checkpointed layers (`checkpoint_layers`) keep no cache while training: the suffix would see nothing
        raise RuntimeError("decode_on_prefixes needs the KV cache, which checkpointed layers do not keep")
    return cache


def select_rows(cache, rows: torch.Tensor):
    """A cache of `cache`'s batch rows `rows` (R,), repeats allowed; `cache` itself is left as it is (transformers'
    layers rebind their tensors when selecting, so shallow copies of them suffice)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(rows)
    return out
