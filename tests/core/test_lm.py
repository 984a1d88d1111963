"""The LM head computed in chunks: the same log-probs and gradients as the plain (N, V) computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit import forward, models
from rlhfkit.core.lm import per_row_sums, target_logps

from tests.conftest import BF16


def plain_logps(hidden, weight, targets):
    return F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])  # one row at a time, chunks with a remainder, one chunk
def test_chunked_target_logps_equal_the_full_log_softmax_and_its_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen, dtype=torch.float64)  # a loss weighting each token differently

    got = target_logps(hidden, weight, targets, chunk)
    torch.autograd.backward(got, upstream)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = plain_logps(hidden, weight, targets)
    torch.autograd.backward(want, upstream)
    # by hand for one row: log p = h·w_t − log Σ_v exp(h·w_v)
    h, t = hidden[5].detach(), targets[5]
    assert torch.isclose(got[5].double(), h @ weight[t].detach() - torch.logsumexp(weight.detach() @ h, 0), atol=1e-6)
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], weight.grad, rtol=0, atol=1e-10)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_the_same():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 8, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64)  # frozen
    targets = torch.randint(0, 20, (9,), generator=gen)
    target_logps(hidden, weight, targets, 4).sum().backward()
    chunked = hidden.grad.clone()
    hidden.grad = None
    plain_logps(hidden, weight, targets).sum().backward()
    torch.testing.assert_close(chunked, hidden.grad, rtol=0, atol=1e-12)
    assert weight.grad is None


def test_per_row_sums():
    select = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    assert per_row_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), select).tolist() == [3.0, 0.0, 7.0]


@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_selected_logits_with_targets_match_the_logits_path_under_autocast(tok, precision):
    # what SFT and DPO now call, against the (N, V) logits they used to make, gradients included
    lm = models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok)
    net = forward.SelectedLogits(lm)
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(1))
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, 5:-1] = True
    targets = ids[:, 1:][select[:, :-1]]
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with cast:
        chunked = net(ids, torch.ones_like(ids), None, select, targets)
    chunked.sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    with cast:
        plain = -F.cross_entropy(net(ids, torch.ones_like(ids), None, select).float(), targets, reduction="none")
    plain.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=0.02, atol=2e-3)
    torch.testing.assert_close(chunked, plain, **tol)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **tol, msg=n)
