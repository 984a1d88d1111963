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
