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

    ids:    (G, P) long: the first `root` columns, then the rest LEFT-padded
    mask:   (G, P) long, 1 on real tokens
    row_of: (B,) long, the prefix of each row
    root:   how many leading tokens all G prefixes share (the chat template's system turn, say), run once for all
            of them (`prefix_cache`); 0: none. Each prefix keeps at least one token of its own after them.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    row_of: torch.Tensor
    root: int = 0

    def to(self, device) -> Prefix:
        return Prefix(self.ids.to(device), self.mask.to(device), self.row_of.to(device), self.root)


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
        return decode_on_prefixes(decoder, prefix, input_ids, attention_mask)


def decode_on_prefixes(decoder, prefix: Prefix, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor,
                       cache=None) -> torch.Tensor:
    """Last hidden states (R, S, H) of the suffixes of the sequences prefix[row_of[r]] + suffix[r], each prefix run
    once: G prefixes (G, P) run into a KV cache (`prefix_cache`), the cache is copied to the R rows that share
    them, and the right-padded suffixes (R, S) run on top of it. What a forward over the R whole sequences gives
    at their suffix positions, up to float rounding (tested in the RM, DPO, PPO and eval tests); gradients flow
    through the copied cache into the prefix's forward. Positions count real tokens only, so padding shifts
    nothing. `cache`: the prefixes' `prefix_cache`, already run (and left as it is), when several batches of
    suffixes share them.
    """
    device, row_of = prefix.ids.device, prefix.row_of
    rows = select_rows(cache if cache is not None else prefix_cache(decoder, prefix), row_of)
    mask = torch.cat([prefix.mask[row_of], suffix_mask], dim=1)  # (R, P + S)
    positions = prefix.mask.sum(1)[row_of, None] + torch.arange(suffix_ids.shape[1], device=device)  # (R, S)
    return decoder(input_ids=suffix_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_arg(): rows}).last_hidden_state


def prefix_cache(decoder, prefix: Prefix):
    """The KV cache (G rows of P keys, laid out as `prefix.ids`) of the G prefixes, for `decode_on_prefixes`: their
    shared root once (1, root), copied to the G rows, then the rest (G, P - root) on top of it; without a root,
    the (G, P) left-padded prefixes at once. Keys sit in the cache's columns as the prefixes' tokens sit in `ids`
    (padding in the middle, after the root): the mask, not the column, says which a query sees."""
    ids, mask, root = prefix.ids, prefix.mask, prefix.root
    cache, kwargs = None, {}
    if root:
        head = decoder(input_ids=ids[:1, :root], attention_mask=mask[:1, :root],
                       position_ids=torch.arange(root, device=ids.device)[None], use_cache=True)
        cache = checked(getattr(head, cache_arg()), root)
        kwargs = {cache_arg(): select_rows(cache, torch.zeros(len(ids), dtype=torch.long, device=ids.device))}
    rest = mask[:, root:]  # (G, P - root), left-padded
    out = decoder(input_ids=ids[:, root:], attention_mask=mask, position_ids=root + (rest.cumsum(1) - 1).clamp(min=0),
                  use_cache=True, **kwargs)
    return checked(getattr(out, cache_arg()), ids.shape[1])


def checked(cache, length: int):
    """`cache`, if it holds `length` positions."""
    if cache is None or cache.get_seq_length() != length:
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
