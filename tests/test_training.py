"""Shared training pieces: the optimizer."""

from __future__ import annotations

import torch

from rlhfkit import models
from rlhfkit.training import RunConfig, adamw


def test_fused_adamw_makes_the_plain_adamw_update(tok):
    # the fused kernel is kept for speed only: its steps must be torch's reference AdamW, weight decay included
    cfg = RunConfig(lr=1e-3, weight_decay=0.1, adam_betas=[0.9, 0.95])
    fused_model = models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok)
    plain_model = models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok)
    fused = adamw(fused_model.parameters(), cfg)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step(), plain.step()
    moved = 0
    for (name, a), b, a0 in zip(fused_model.named_parameters(), plain_model.parameters(),
                                models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        moved += not torch.equal(a, a0)
    assert moved == len(list(plain_model.parameters()))


def test_length_grouped_batches_cover_each_epoch_once_and_pad_less():
    # `group_by_length`: the epoch's permutation in mega-batches of 8 global batches, each sorted longest first;
    # every row still comes once per epoch, a batch's rows come from one mega-batch of the plain order, and the
    # batches pad less than the plain ones
    from rlhfkit.training import GROUP_BATCHES, global_batch_rows

    n, batch = 100, 4  # 25 steps per epoch: three full mega-batches of 32 rows and one of 4
    lengths = [(7 * i) % 31 + 1 for i in range(n)]
    for epoch in (0, 1):
        steps = range(epoch * 25, (epoch + 1) * 25)
        grouped = [global_batch_rows(s, n, batch, seed=3, lengths=lengths) for s in steps]
        plain = [global_batch_rows(s, n, batch, seed=3) for s in steps]
        assert sorted(r for b in grouped for r in b) == list(range(n))
        for m in range(0, 25, GROUP_BATCHES):
            mega_g = [r for b in grouped[m:m + GROUP_BATCHES] for r in b]
            assert set(mega_g) == {r for b in plain[m:m + GROUP_BATCHES] for r in b}
            assert [lengths[r] for r in mega_g] == sorted((lengths[r] for r in mega_g), reverse=True)
        padded = lambda batches: sum(len(b) * max(lengths[r] for r in b) for b in batches)  # noqa: E731
        assert padded(grouped) < 0.8 * padded(plain)
    assert global_batch_rows(30, n, batch, seed=3, lengths=lengths) == global_batch_rows(30, n, batch, 3, lengths)
