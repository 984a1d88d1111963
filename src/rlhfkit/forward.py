"""One forward path for every trainer and evaluator: SFT, DPO, PPO (PPO-ptx included), the reward model's
training and scoring, and eval's log-probs all build a `Batch` with `rows` and read it here.

A `Batch` is B token rows, right-padded, with the positions whose logits are read and the tokens scored there.
Rows of one group (a prompt's n samples, a pair's chosen and rejected, a prompt's K ranked responses) start with
the same tokens; `rows` runs that start once as a shared prefix (`fast.prefixes`) and keeps only each row's own
suffix, from the group the caller already knows; what all the groups' prefixes start with (the chat template's
system turn) runs once for all of them. The models read a batch:

- `SelectedLogits`, a causal LM: logits, token log-probs (`token_logps`) or sequence log-probs
  (`sequence_logps`) at the selected positions;
- `ValueModel`, a sequence-classification model read at the selected positions (PPO's critic, `values`);
- a sequence-classification model read at each row's last token (the reward model, `scores`).

Models whose first blocks are the same frozen weights (PPO's actor and reference) can run them once: `entry` gives
a batch's hidden states entering a block, `store_entry` keeps them per row, and a `Batch` whose `entry` is set
(`stored_entry`) runs only the blocks from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from rlhfkit.core.lm import per_row_sums, shifted_selection, target_logps, token_logits
from rlhfkit.data.collate import collate, pad_left
from rlhfkit.fast import attention, prefixes
from rlhfkit.fast.prefixes import Entry, Prefix


class Row(NamedTuple):
    """One sequence: its tokens and, for each, 1 where it is trained or scored (its logit sits at t − 1)."""

    input_ids: list[int]
    loss_mask: list[int]


class Batch(NamedTuple):
    """One forward's inputs: B rows of T tokens, M positions selected. The fields are, in order, the arguments
    of `SelectedLogits.forward` (a data-parallel wrapper then hooks the forward that runs).

    input_ids:      (B, T) long, right-padded; with a prefix, the rows' suffixes
    attention_mask: (B, T) long, 1 on real tokens; None for packed rows (their boundaries are in position_ids)
    position_ids:   (B, T) long for packed rows, else None (from the mask; unused with a prefix)
    select:         (B, T) bool, the positions whose logits are read: those before a trained token
    targets:        (M,) long, the tokens the selected logits are scored against
    prefix:         the `Prefix` the rows run on, or None
    entry:          the `Entry` the model starts from, the hidden states of these tokens from blocks it shares
                    with another model (`entry`); None: it runs all its blocks
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    select: torch.Tensor
    targets: torch.Tensor
    prefix: Prefix | None
    entry: Entry | None = None

    def to(self, device) -> Batch:
        put = lambda t: None if t is None else t.to(device)  # noqa: E731
        entry = None if self.entry is None else Entry(self.entry.block, put(self.entry.suffix), put(self.entry.prefix))
        return Batch(*(put(t) for t in self[:5]), None if self.prefix is None else self.prefix.to(device), entry)

    def take(self, idx: list[int]) -> Batch:
        """The rows idx (on a prefix: still on it), without the columns that are padding in all of them."""
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())
        prefix = None if self.prefix is None else self.prefix._replace(row_of=self.prefix.row_of[idx])
        entry = None if self.entry is None else self.entry._replace(suffix=self.entry.suffix[idx, :width])
        select = self.select[idx]
        return Batch(self.input_ids[idx, :width], mask[:, :width], None, select[:, :width],
                     self.input_ids[idx][:, 1:][select[:, :-1]], prefix, entry)

    @property
    def num_tokens(self) -> int:
        """Tokens of the B rows as if run whole (a shared prefix counts once per row)."""
        shared = 0 if self.prefix is None else int(self.prefix.mask.sum(1)[self.prefix.row_of].sum())
        return int(self.attention_mask.sum()) + shared


def rows(seqs: Sequence, pad_id: int, groups: Sequence[int] | None = None) -> Batch:
    """A batch of `seqs` (`Row`s, or `data.chat.TokenizedExample` / `data.collate.PackedRow`), right-padded
    (`collate`). With `groups` (one id per row), the rows of a group share the tokens they all start with, up to
    the position whose logit predicts the first trained token and at least one token short of the shortest row:
    those run once as a prefix. That only when some group has several rows and every group shares a token;
    otherwise every row runs whole, as without groups."""
    cuts = shared_cuts(seqs, groups) if groups is not None else None
    prefix = None
    if cuts is not None:
        first = {}  # group -> its first row, in order of appearance: the prefixes' order
        for i, g in enumerate(groups):
            first.setdefault(g, i)
        order = {g: k for k, g in enumerate(first)}
        starts = [seqs[i].input_ids[:cuts[g]] for g, i in first.items()]
        # what every prefix starts with (the chat template's system turn), each keeping one token of its own
        root = prefixes.shared_prefix_length(starts) if len(starts) > 1 else 0
        ids, mask = pad_left([s[root:] for s in starts], pad_id)  # (G, P - root)
        ids = torch.cat([torch.tensor([starts[0][:root]], dtype=ids.dtype).expand(len(starts), root), ids], dim=1)
        mask = torch.cat([torch.ones((len(starts), root), dtype=mask.dtype), mask], dim=1)  # (G, P)
        prefix = Prefix(ids, mask, torch.tensor([order[g] for g in groups]), root)
        seqs = [Row(s.input_ids[cuts[g]:], s.loss_mask[cuts[g]:]) for s, g in zip(seqs, groups)]
    batch = collate(seqs, pad_id)
    select, targets = shifted_selection(batch.input_ids, batch.loss_mask)
    return Batch(batch.input_ids, batch.attention_mask, batch.position_ids, select, targets, prefix)


def shared_cuts(seqs: Sequence, groups: Sequence[int]) -> dict[int, int] | None:
    """Each group's shared tokens (see `rows`), or None when sharing saves nothing or is impossible."""
    members: dict[int, list] = {}
    for s, g in zip(seqs, groups):
        members.setdefault(g, []).append(s)
    if len(members) == len(seqs):
        return None
    cuts = {}
    for g, group in members.items():
        trained = [s.loss_mask.index(1) - 1 for s in group if 1 in s.loss_mask]
        cuts[g] = min([prefixes.shared_prefix_length([s.input_ids for s in group])] + trained)
        if cuts[g] <= 0:
            return None
    return cuts


# --- the models -----------------------------------------------------------------------------------------------


class SelectedLogits(torch.nn.Module):
    """A causal LM whose forward returns logits only at selected positions: (M, V), never (B, T, V).

    Training wraps the model in this module (and data-parallel wraps this module), so the forward that DDP
    hooks is the one that runs, while the vocabulary projection skips the prompt and padding positions.
    """

    def __init__(self, lm, short_math_attention: bool = True):
        super().__init__()
        self.lm = lm
        # trainers: `training_attention` (math kernel at short lengths, in every pass, so that their reference
        # passes match their training forwards); evaluation, forward only, turns it off: there flash is faster
        self.short_math_attention = short_math_attention

    @property
    def decoder(self):
        return self.lm.get_decoder()

    def forward(self, input_ids, attention_mask, position_ids, select, targets=None, prefix: Prefix | None = None,
                entry: Entry | None = None):
        """A `Batch`'s fields. Logits (M, V) at the selected positions; with targets (M,), only their log-probs
        (M,) fp32, the head computed in chunks so that no (M, V) tensor is kept (`core.lm.target_logps`)."""
        hidden = prefixes.decode(self.decoder, input_ids, attention_mask, position_ids, prefix,
                                 self.short_math_attention, entry)  # (B, T, H)
        head = self.lm.get_output_embeddings()
        if targets is not None and isinstance(head, torch.nn.Linear) and head.bias is None:
            return target_logps(hidden[select], head.weight, targets)  # (M,)
        logits = token_logits(hidden, head, select)  # (M, V)
        if targets is None:
            return logits
        return -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


class ValueModel(torch.nn.Module):
    """A sequence-classification model read at every selected position: values (M,) instead of one score."""

    short_math_attention = True

    def __init__(self, seq_cls):
        super().__init__()
        self.model = seq_cls

    @property
    def decoder(self):
        return self.model.base_model

    def forward(self, input_ids, attention_mask, position_ids, select, targets=None, prefix: Prefix | None = None,
                entry: Entry | None = None):
        """A `Batch`'s fields (targets unused)."""
        hidden = prefixes.decode(self.decoder, input_ids, attention_mask, position_ids, prefix,
                                 self.short_math_attention, entry)  # (B, T, H)
        return self.model.score(hidden[select]).squeeze(-1).float()  # (M,)


def logits(net: SelectedLogits, batch: Batch) -> torch.Tensor:
    """(M, V) logits at the selected positions."""
    return net(*batch._replace(targets=None))


def token_logps(net: SelectedLogits, batch: Batch) -> torch.Tensor:
    """(M,) fp32 log-probs of the targets."""
    return net(*batch)


def sequence_logps(net: SelectedLogits, batch: Batch) -> torch.Tensor:
    """(B,) fp32: each row's summed log-probs of its trained tokens, log π(y | x)."""
    return per_row_sums(token_logps(net, batch), batch.select)


def values(critic: ValueModel, batch: Batch) -> torch.Tensor:
    """(M,) fp32 values at the selected positions."""
    return critic(*batch)


# --- shared blocks: hidden states kept per row, for models that start from them ------------------------------


def entry(net: SelectedLogits | ValueModel, batch: Batch, stop: int) -> Entry:
    """The batch's `Entry` into block `stop` of `net`, from its blocks below."""
    return prefixes.decode(net.decoder, *batch[:3], batch.prefix, net.short_math_attention, stop=stop)


def token_index(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where a batch made by `rows` holds each row's tokens: (B, T) the index in its row of each input_ids token,
    and with a prefix, (B, P) the index in row b of each of its prefix's tokens; -1 at padding."""
    width = batch.input_ids.shape[1]
    columns = torch.arange(width, device=batch.input_ids.device)
    if batch.prefix is None:
        return torch.where(batch.attention_mask.bool(), columns, -1), None
    prefix = batch.prefix
    lengths = prefix.mask.sum(1)[prefix.row_of]  # (B,) tokens before each row's suffix
    suffix = torch.where(batch.attention_mask.bool(), lengths[:, None] + columns, -1)
    return suffix, torch.where(prefix.mask.bool(), prefix.mask.cumsum(1) - 1, -1)[prefix.row_of]


def stored_entry(batch: Batch, store: torch.Tensor, block: int) -> Entry:
    """The `Entry` into block `block` of a batch made by `rows`, from `store` (B, L, H): each row's hidden states
    at its tokens, as `store_entry` writes them."""
    suffix, prefix = token_index(batch)
    rows = torch.arange(len(store), device=store.device)[:, None]
    at = lambda index: store[rows, index.clamp(min=0)] * (index >= 0)[..., None].to(store.dtype)  # noqa: E731
    if prefix is None:
        return Entry(block, at(suffix), None)
    first = torch.full((len(batch.prefix.ids),), len(store), device=store.device)
    first = first.scatter_reduce(0, batch.prefix.row_of, torch.arange(len(store), device=store.device), "amin")
    return Entry(block, at(suffix), at(prefix)[first])  # (G, P, H): each prefix from its first row


def store_entry(batch: Batch, entry: Entry, store: torch.Tensor) -> None:
    """Write a batch's `Entry` into `store` (B, L, H) at each row's tokens: row b's token j at store[b, j]."""
    suffix, prefix = token_index(batch)
    rows, cols = (suffix >= 0).nonzero(as_tuple=True)
    store[rows, suffix[rows, cols]] = entry.suffix[rows, cols].to(store.dtype)
    if prefix is not None:
        rows, cols = (prefix >= 0).nonzero(as_tuple=True)
        store[rows, prefix[rows, cols]] = entry.prefix[batch.prefix.row_of[rows], cols].to(store.dtype)


def scores(model, batch: Batch, cache=None, short_math_attention: bool = True) -> torch.Tensor:
    """(B,) fp32 scores of a sequence-classification model (the reward model), read at each row's last real
    token, where transformers pools right-padded rows. Whole rows run through the model's own forward (so a
    data-parallel or autocast wrapper on it applies); rows on a prefix through `prefixes.decode_on_prefixes`,
    under the caller's autocast. `cache`: the prefixes' `score_cache`, when several batches run on them.
    `short_math_attention`: as in `SelectedLogits` (trainers on; scoring off)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    key_len = batch.input_ids.shape[1] + (0 if batch.prefix is None else batch.prefix.ids.shape[1])
    with attention.for_forward(key_len, device, short_math_attention):
        if batch.prefix is None:
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()
        hidden = prefixes.decode_on_prefixes(model.base_model, batch.prefix, batch.input_ids, batch.attention_mask,
                                             cache)  # (B, S, H)
    last = hidden[torch.arange(len(hidden), device=device), batch.attention_mask.sum(1) - 1]  # (B, H)
    return model.score(last)[:, 0].float()


def score_cache(model, prefix: Prefix):
    """The KV cache of a batch's prefixes, run once for several `scores` calls on them (scoring only)."""
    device = next(model.parameters()).device
    with attention.native_gqa(device):
        return prefixes.prefix_cache(model.base_model, prefix.to(device))
