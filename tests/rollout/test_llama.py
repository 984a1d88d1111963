"""LlamaBatch: the sampling forward passes on fused weights and a slot KV cache give transformers' logits."""

from __future__ import annotations

import pytest
import torch

from rlhfkit import models
from rlhfkit.rollout import SamplingParams, llama
from rlhfkit.rollout.hf import HFEngine

from tests.conftest import needs_native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

# a shared start (the template's), then prompts of different lengths
PROMPTS = [[{"role": "user", "content": c}] for c in
           ("hi", "Tell me a long story about a dragon and a knight.", "What is 2+2?", "Name three colours, please.")]


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits (V,) of a forward pass over `ids` alone: no cache, no padding."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5),
                                         pytest.param(torch.bfloat16, 0.02, marks=needs_native_bf16)])
def test_joins_steps_and_leaves_give_the_logits_of_plain_forward_passes(tok, dtype, atol):
    """Rows join an empty and then a running batch, step, one leaves, the others step on: each row's logits are
    those of transformers' forward over its prompt and tokens so far (bf16: the model cast to bf16; its logits
    reach ~0.7 here and differ by ≤ 0.004, bf16's rounding at that size, from another order of operations)."""
    model = models.load_causal_lm("tiny-llama", tokenizer=tok).eval()
    prompts = [HFEngine(model, tok).encode_prompt(p) for p in PROMPTS]
    batch = llama.LlamaBatch(llama.LlamaWeights(model, dtype), prompts, slots=4, max_new_tokens=4)
    reference = model.to(dtype)
    assert 0 < len(batch.prefix) < min(len(p) for p in prompts) and all(p[:len(batch.prefix)] == batch.prefix
                                                                           for p in prompts)
    rows = [prompts[0], prompts[1]]
    logits = batch.join(rows)
    rows += [prompts[2], prompts[1]]  # a repeated prompt runs once and fills two slots
    logits = torch.cat([logits, batch.join(rows[2:])])
    for step in range(3):
        for row, ids in enumerate(rows):
            torch.testing.assert_close(logits[row], plain_logits(reference, ids), atol=atol, rtol=0)
        token = logits.argmax(-1)
        rows = [ids + [int(t)] for ids, t in zip(rows, token)]
        if step == 1:  # row 1 leaves; rows 0, 2, 3 move to slots 0, 1, 2
            keep = torch.tensor([0, 2, 3])
            batch.keep(keep)
            rows, token = [rows[k] for k in keep.tolist()], token[keep]
        logits = batch.step(token)
    assert len(batch) == 3


def test_a_finished_row_fed_past_the_capacity_changes_no_other_row(tok):
    # a row that has finished waits in the batch, fed padding, until an eighth of the batch has finished; with the
    # longest prompt and max_new_tokens sampled it would write past the cache: it rewrites its last column instead
    model = models.load_causal_lm("tiny-llama", tokenizer=tok).eval()
    prompts = [HFEngine(model, tok).encode_prompt(p) for p in PROMPTS[:2]]
    batch = llama.LlamaBatch(llama.LlamaWeights(model, torch.float32), prompts, slots=2, max_new_tokens=2)
    logits = batch.join(prompts)
    seqs = [list(p) for p in prompts]
    for _ in range(5):  # the longest row is at its capacity after 2 steps
        token = logits.argmax(-1)
        seqs[0].append(int(token[0]))
        logits = batch.step(token)
        torch.testing.assert_close(logits[0], plain_logits(model, seqs[0]), atol=1e-5, rtol=0)


def test_a_lora_model_is_sampled_with_its_adapters_merged_and_is_left_as_it_was(tok):
    model = models.load_causal_lm("tiny-llama", tokenizer=tok)
    lora = models.apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj"]).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapters matter
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    ids = HFEngine(model, tok).encode_prompt(PROMPTS[1])
    batch = llama.LlamaBatch(llama.LlamaWeights(lora, torch.float32), [ids], slots=1, max_new_tokens=1)
    got = batch.join([ids])[0]
    torch.testing.assert_close(got, plain_logits(lora, ids), atol=1e-5, rtol=0)
    with lora.disable_adapter():
        assert (got - plain_logits(lora, ids)).abs().max() > 1e-2  # the adapters changed the logits
    after = lora.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_other_architectures_use_transformers_forward(tok):
    model = models.load_causal_lm("tiny-llama", tokenizer=tok)
    biased = type(model)(models.tiny_llama_config(len(tok), attention_bias=True)).eval()
    assert llama.unsupported(model) is None and "biases" in llama.unsupported(biased)
    dynamic = models.tiny_llama_config(len(tok), rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "RoPE type 'dynamic'" in llama.unsupported(type(model)(dynamic))
    params = SamplingParams(max_new_tokens=4, seed=0)
    with pytest.raises(ValueError, match="backend 'llama' cannot run"):
        HFEngine(biased, tok, backend="llama").generate(PROMPTS, params)
    auto = HFEngine(biased, tok).generate(PROMPTS, params)
    assert torch.equal(auto.response_ids, HFEngine(biased, tok, backend="hf").generate(PROMPTS, params).response_ids)
