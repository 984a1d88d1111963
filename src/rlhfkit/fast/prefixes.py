"""Shared prefixes: rows that start with the same tokens (a prompt's n samples, a pair's chosen and rejected) run
that start once into a KV cache and only their own suffixes on top of it. Shared blocks: models whose first blocks
are the same frozen weights (PPO's actor and its reference) run them once, into an `Entry`, and each runs only its
own blocks from there."""

from __future__ import annotations

import contextlib
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


class Entry(NamedTuple):
    """A batch's hidden states entering block `block`, from the blocks below it: what models that share those
    blocks (the same frozen weights) start their own blocks from, instead of each running them.

    suffix: (B, T, H) at the batch's input_ids (with a prefix, its suffixes); 0 at padding
    prefix: (G, P, H) at its prefix's ids, 0 at padding; None without a prefix
    """

    block: int
    suffix: torch.Tensor
    prefix: torch.Tensor | None


@contextlib.contextmanager
def blocks(decoder, start: int, stop: int):
    """The decoder's forward through its blocks [start, stop) only, for a transformers model that runs
    `self.layers` in order between its embedding and its final `self.norm` (Llama's layout: `can_run_blocks`):
    started from `inputs_embeds` (the hidden states entering block start), and short of the last block, ending
    with the hidden states entering block stop, not normed."""
    layers, norm = decoder.layers, decoder.norm
    if (start, stop) == (0, len(layers)):
        yield
        return
    decoder.layers = layers[start:stop]
    if stop < len(layers):
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def can_run_blocks(decoder) -> bool:
    """Whether `blocks` holds for this decoder (checked model types; the others run whole)."""
    return decoder.config.model_type in ("llama",) and hasattr(decoder, "layers") and hasattr(decoder, "norm")


def new_cache(decoder, start: int):
    """An empty KV cache for a forward from block `start`: the blocks below hold none (transformers then sizes the
    attention mask by block start's)."""
    from transformers.cache_utils import DummyLayer, DynamicCache

    cache = DynamicCache(config=decoder.config)
    cache.layers[:start] = [DummyLayer() for _ in range(start)]
    return cache


def run_blocks(decoder, ids: torch.Tensor, hidden: torch.Tensor | None, start: int, stop: int, **kwargs):
    """The decoder's output through blocks [start, stop) (`blocks`): on token ids from block 0, else on `hidden`,
    the hidden states entering block start."""
    with blocks(decoder, start, stop):
        inputs = {"input_ids": ids} if start == 0 else {"inputs_embeds": hidden}
        return decoder(**inputs, **kwargs)


def span(decoder, entry: Entry | None, stop: int | None) -> tuple[int, int, int]:
    """(first block, block stopped before, number of blocks) of a forward from `entry` (None: the tokens) to
    `stop` (None: the top)."""
    n = len(decoder.layers)
    return (0 if entry is None else entry.block), (n if stop is None else stop), n


def decode(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
           prefix: Prefix | None = None, short_math_attention: bool = True, entry: Entry | None = None,
           stop: int | None = None):
    """Last hidden states (B, T, H) of a trainer's forward: whole rows, or with `prefix` the rows' suffixes on
    shared prefixes (`decode_on_prefixes`; position_ids unused), under `training_attention` unless
    `short_math_attention` is off (then `native_gqa` only). With `stop`, only the blocks below it: their `Entry`
    into block stop; with `entry`, only the blocks from entry.block on, from its hidden states."""
    key_len = input_ids.shape[1] + (0 if prefix is None else prefix.ids.shape[1])
    with for_forward(key_len, input_ids.device, short_math_attention):
        if prefix is not None:
            return decode_on_prefixes(decoder, prefix, input_ids, attention_mask, entry=entry, stop=stop)
        start, stop, n = span(decoder, entry, stop)
        hidden = run_blocks(decoder, input_ids, None if entry is None else entry.suffix, start, stop,
                            attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return hidden if stop == n else Entry(stop, masked(hidden, attention_mask), None)


def masked(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(N, L, H) hidden states with 0 at padding (mask (N, L) 0; None: no padding): a padded key's value then stays
    finite in the blocks that read them."""
    return hidden if mask is None else hidden * mask[..., None].to(hidden.dtype)


def decode_on_prefixes(decoder, prefix: Prefix, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor,
                       cache=None, entry: Entry | None = None, stop: int | None = None):
    """Last hidden states (R, S, H) of the suffixes of the sequences prefix[row_of[r]] + suffix[r], each prefix run
    once: G prefixes (G, P) run into a KV cache (`prefix_cache`), the cache is copied to the R rows that share
    them, and the right-padded suffixes (R, S) run on top of it. What a forward over the R whole sequences gives
    at their suffix positions, up to float rounding (tested in the RM, DPO, PPO and eval tests); gradients flow
    through the copied cache into the prefix's forward. Positions count real tokens only, so padding shifts
    nothing. `cache`: the prefixes' `prefix_cache`, already run (and left as it is), when several batches of
    suffixes share them. `entry`, `stop`: as in `decode` (not with `cache`).
    """
    device, row_of = prefix.ids.device, prefix.row_of
    start, stop, n = span(decoder, entry, stop)
    prefix_hidden = None
    if cache is None:
        cache, prefix_hidden = prefix_pass(decoder, prefix, entry, stop)
    rows = select_rows(cache, row_of)
    mask = torch.cat([prefix.mask[row_of], suffix_mask], dim=1)  # (R, P + S)
    positions = prefix.mask.sum(1)[row_of, None] + torch.arange(suffix_ids.shape[1], device=device)  # (R, S)
    hidden = run_blocks(decoder, suffix_ids, None if entry is None else entry.suffix, start, stop,
                        attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_arg(): rows}).last_hidden_state
    return hidden if stop == n else Entry(stop, masked(hidden, suffix_mask), prefix_hidden)


def prefix_cache(decoder, prefix: Prefix):
    """The KV cache (G rows of P keys, laid out as `prefix.ids`) of the G prefixes, for `decode_on_prefixes`."""
    return prefix_pass(decoder, prefix)[0]


def prefix_pass(decoder, prefix: Prefix, entry: Entry | None = None, stop: int | None = None):
    """(KV cache, hidden states) of the G prefixes through the blocks of `decode`'s `entry` and `stop`: their shared
    root once (1, root), copied to the G rows, then the rest (G, P - root) on top of it; without a root, the (G, P)
    left-padded prefixes at once. Keys sit in the cache's columns as the prefixes' tokens sit in `ids` (padding in
    the middle, after the root): the mask, not the column, says which a query sees. The hidden states (G, P, H)
    entering block stop when stop is short of the top, else None."""
    ids, mask, root = prefix.ids, prefix.mask, prefix.root
    start, stop, n = span(decoder, entry, stop)
    given = None if entry is None else entry.prefix  # (G, P, H)
    cache, parts = new_cache(decoder, start), []
    if root:
        head = run_blocks(decoder, ids[:1, :root], None if given is None else given[:1, :root], start, stop,
                          attention_mask=mask[:1, :root],
                          position_ids=torch.arange(root, device=ids.device)[None], use_cache=True,
                          **{cache_arg(): cache})
        root_cache = checked(getattr(head, cache_arg()), root, start)
        cache = select_rows(root_cache, torch.zeros(len(ids), dtype=torch.long, device=ids.device))
        parts.append(head.last_hidden_state.expand(len(ids), -1, -1))
    rest = mask[:, root:]  # (G, P - root), left-padded
    out = run_blocks(decoder, ids[:, root:], None if given is None else given[:, root:], start, stop,
                     attention_mask=mask, position_ids=root + (rest.cumsum(1) - 1).clamp(min=0), use_cache=True,
                     **{cache_arg(): cache})
    parts.append(out.last_hidden_state)
    hidden = None if stop == n else masked(torch.cat(parts, dim=1), mask)
    return checked(getattr(out, cache_arg()), ids.shape[1], start), hidden


def checked(cache, length: int, block: int = 0):
    """`cache`, if it holds `length` positions (at `block`, the first block that ran)."""
    if cache is None or cache.get_seq_length(block) != length:
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
