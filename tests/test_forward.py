"""The one forward path's batch builder (`forward.rows`), worked by hand; the models' numbers on a shared prefix
against whole rows are tested where each trainer uses them (DPO, PPO, the RM, eval)."""

from __future__ import annotations

import torch

from rlhfkit import forward
from rlhfkit.forward import Row

PAD = 0


def test_rows_without_groups_are_right_padded_with_the_logits_before_each_trained_token():
    batch = forward.rows([Row([5, 6, 7], [0, 1, 1]), Row([8, 9], [0, 1])], PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.select.tolist() == [[True, True, False], [True, False, False]]  # logit at t predicts t + 1
    assert batch.targets.tolist() == [6, 7, 9]
    assert batch.prefix is None and batch.position_ids is None and batch.num_tokens == 5


def test_rows_of_a_group_run_their_common_start_once_up_to_the_first_trained_token():
    # group 0: prompt [1, 2, 3], responses [4, 5] and [4, 6] (their common first token is trained, so stays);
    # group 1: prompt [7], one response: its prefix keeps all but the token before the response
    seqs = [Row([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), Row([7, 8], [0, 1]), Row([1, 2, 3, 4, 6], [0, 0, 0, 1, 1])]
    assert forward.shared_cuts(seqs, [0, 1, 0]) is None  # group 1's prompt has no token to share
    seqs[1] = Row([7, 7, 8], [0, 0, 1])
    assert forward.shared_cuts(seqs, [0, 1, 0]) == {0: 2, 1: 1}
    batch = forward.rows(seqs, PAD, [0, 1, 0])
    assert batch.prefix.ids.tolist() == [[1, 2], [PAD, 7]] and batch.prefix.mask.tolist() == [[1, 1], [0, 1]]
    assert batch.prefix.row_of.tolist() == [0, 1, 0]
    assert batch.input_ids.tolist() == [[3, 4, 5], [7, 8, PAD], [3, 4, 6]]
    assert batch.select.tolist() == [[True, True, False], [True, False, False], [True, True, False]]
    assert batch.targets.tolist() == [4, 5, 8, 4, 6]
    assert batch.num_tokens == 5 + 3 + 5
    # rows alone in their groups save nothing: every row runs whole
    assert forward.rows(seqs, PAD, [0, 1, 2]).prefix is None
    # nothing trained (a reward model's rows): all but the last token of the shortest row is shared
    scored = forward.rows([Row([1, 2, 3], [0, 0, 0]), Row([1, 2, 3, 4], [0, 0, 0, 0])], PAD, [0, 0])
    assert scored.prefix.ids.tolist() == [[1, 2]] and scored.input_ids.tolist() == [[3, PAD], [3, 4]]


def test_take_keeps_the_rows_on_their_prefix_without_padding_columns():
    seqs = [Row([1, 2, 3, 4, 5, 9], [0, 0, 0, 1, 1, 1]), Row([7, 7, 8], [0, 0, 1]), Row([1, 2, 3, 4], [0, 0, 0, 1])]
    batch = forward.rows(seqs, PAD, [0, 1, 0])
    part = batch.take([1, 2])
    assert part.input_ids.tolist() == [[7, 8], [3, 4]] and part.attention_mask.tolist() == [[1, 1], [1, 1]]
    assert part.prefix.row_of.tolist() == [1, 0] and torch.equal(part.prefix.ids, batch.prefix.ids)
    assert part.select.tolist() == [[True, False], [True, False]] and part.targets.tolist() == [8, 4]


def test_what_all_prefixes_start_with_is_their_root_run_once_then_each_rest_left_padded():
    # group 0 shares [1, 2] (its first trained token is at 3); group 1, one row, all but the token before its
    # response: [1, 7, 7]. Both start with [1]: the root, the first column; the rests are left-padded after it
    seqs = [Row([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), Row([1, 7, 7, 9, 8], [0, 0, 0, 0, 1]),
            Row([1, 2, 3, 4, 6], [0, 0, 0, 1, 1])]
    batch = forward.rows(seqs, PAD, [0, 1, 0])
    assert batch.prefix.root == 1
    assert batch.prefix.ids.tolist() == [[1, PAD, 2], [1, 7, 7]]
    assert batch.prefix.mask.tolist() == [[1, 0, 1], [1, 1, 1]]
    assert batch.input_ids.tolist() == [[3, 4, 5], [9, 8, PAD], [3, 4, 6]]
    assert batch.num_tokens == 5 + 5 + 5
    # one group has no other prefix to share with: no root
    assert forward.rows(seqs[::2], PAD, [0, 0]).prefix.root == 0


def test_the_tokens_of_a_batch_on_prefixes_are_found_in_their_rows_and_kept_per_row():
    # the root example's batch: where each token sits in its row (`token_index`), and an `Entry` written per row
    # (`store_entry`) and read back (`stored_entry`); each token's "hidden state" is its own id
    seqs = [Row([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), Row([1, 7, 7, 9, 8], [0, 0, 0, 0, 1]),
            Row([1, 2, 3, 4, 6], [0, 0, 0, 1, 1])]
    batch = forward.rows(seqs, PAD, [0, 1, 0])
    suffix, prefix = forward.token_index(batch)
    assert suffix.tolist() == [[2, 3, 4], [3, 4, -1], [2, 3, 4]]  # after prefixes of 2, 3 and 2 tokens
    assert prefix.tolist() == [[0, -1, 1], [0, 1, 2], [0, -1, 1]]  # each row's prefix: [1, PAD, 2], [1, 7, 7]
    ids = lambda t, mask: (t * mask).float()[..., None]  # noqa: E731  (N, L, 1)
    entry = forward.Entry(3, ids(batch.input_ids, batch.attention_mask), ids(batch.prefix.ids, batch.prefix.mask))
    store = torch.full((3, 5, 1), -1.0)
    forward.store_entry(batch, entry, store)
    assert store[..., 0].tolist() == [s.input_ids for s in seqs]
    back = forward.stored_entry(batch, store, 3)
    assert back.block == 3 and torch.equal(back.suffix, entry.suffix) and torch.equal(back.prefix, entry.prefix)
    # whole rows: the suffix is the row, padding read as 0
    whole = forward.rows(seqs[:2], PAD)
    assert forward.token_index(whole)[0].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert forward.stored_entry(whole, store[:2], 3).suffix[..., 0].tolist() == [[1, 2, 3, 4, 5], [1, 7, 7, 9, 8]]
