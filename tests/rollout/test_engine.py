"""The HF rollout engine: seeding, left padding and the KV cache, stopping, max_new_tokens, the sampler's maths."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhfkit import UsageError, models
from rlhfkit.fast import layers
from rlhfkit.data import chat
from rlhfkit.rollout import SamplingParams
import numpy as np

from rlhfkit.rollout.hf import HFEngine, sample_tokens, sample_tokens_topk, tempered

# three prompts of different lengths, so a batch of them is left-padded
PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon and a knight who become friends, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(tok):
    return models.load_causal_lm("tiny-llama", tokenizer=tok)


@pytest.fixture(params=["hf", "llama"])
def backend(request):
    """Each sampling test runs on both running batches: transformers' forward (`HFBatch`) and `LlamaBatch`."""
    return request.param


def sample(policy, tok, batch_size: int = 8, backend: str = "auto", **params):
    return HFEngine(policy, tok, batch_size, backend=backend).generate(
        PROMPTS, SamplingParams(**{"max_new_tokens": 8, **params}))


def same(a, b) -> bool:
    return (torch.equal(a.response_ids, b.response_ids) and torch.equal(a.finished, b.finished)
            and a.texts == b.texts)


# --- seeding ------------------------------------------------------------------------------------------------


def test_same_seed_same_samples_and_another_seed_other_samples(policy, tok, backend):
    a = sample(policy, tok, backend=backend, n=2, seed=1)
    assert same(a, sample(policy, tok, backend=backend, n=2, seed=1))
    b = sample(policy, tok, backend=backend, n=2, seed=2)
    assert all(x != y for x, y in zip(a.texts, b.texts))
    assert a.texts[0] != a.texts[1]  # the n samples of one prompt differ too


def test_rows_are_prompt_major_and_sample_j_does_not_depend_on_n(policy, tok, backend):
    one = sample(policy, tok, backend=backend, n=1, seed=7)
    three = sample(policy, tok, backend=backend, n=3, seed=7)
    assert three.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert three.sample_index.tolist() == [0, 1, 2] * 3 and three.n == 3
    first = three.sample_index == 0
    assert [t for t, f in zip(three.texts, first) if f] == one.texts
    assert torch.equal(three.response_ids[first][:, :one.response_ids.shape[1]], one.response_ids)


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, n=2),
                                    dict(temperature=0.7, top_p=0.9)])
def test_batched_equals_one_row_at_a_time(policy, tok, backend, params):
    batched = sample(policy, tok, backend=backend, batch_size=8, seed=3, **params)
    assert same(batched, sample(policy, tok, backend=backend, batch_size=1, seed=3, **params))


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, n=3),
                                    dict(temperature=0.7, top_p=0.9, n=2)])
def test_rows_joining_a_running_batch_sample_what_they_sample_alone(policy, tok, backend, params, monkeypatch):
    # continuous batching: as rows stop, the next ones are prefilled and join the running batch (HFBatch: their
    # KV cache left-padded to its length, the batch's cropped as rows leave; LlamaBatch: free slots, the holes
    # filled by the rows behind as others leave); no row's tokens may change. A random model stopping on a fifth
    # of the vocabulary gives rows of many lengths, so rows leave at different steps
    from rlhfkit.rollout import hf, llama

    cls = {"hf": hf.HFBatch, "llama": llama.LlamaBatch}[backend]
    joins = []  # rows already running when others joined
    real = cls.join

    def counting_join(self, prompts):
        if len(self):
            joins.append(len(self))
        return real(self, prompts)

    monkeypatch.setattr(cls, "join", counting_join)
    p = SamplingParams(**{"max_new_tokens": 12, "seed": 5, **params})
    stops = range(3, len(tok), 5)
    prompts = [[{"role": "user", "content": f"Question {k}:" + " and then" * k}] for k in range(10)]
    alone = HFEngine(policy, tok, 1, stop_ids=stops, backend=backend).generate(prompts, p)
    assert len(set(alone.response_lengths.tolist())) > 2 and not joins
    for batch_size in (2, 3, 5):
        assert same(HFEngine(policy, tok, batch_size, stop_ids=stops, backend=backend).generate(prompts, p), alone)
    assert len(joins) > 5 and any(n > 1 for n in joins)  # rows joined batches that were still running
    if backend == "llama":  # and the same tokens as transformers' forward
        assert same(HFEngine(policy, tok, 3, stop_ids=stops, backend="hf").generate(prompts, p), alone)


def test_rows_that_stay_keep_their_place_and_the_rest_fill_the_holes():
    from rlhfkit.rollout.hf import fill_holes

    # rows 1 and 4 of 7 left: 0, 2, 3 stay in place, 5 and 6 move into positions 1 and 4
    assert fill_holes(torch.tensor([0, 2, 3, 5, 6])).tolist() == [0, 5, 2, 3, 6]
    assert fill_holes(torch.tensor([0, 1, 2])).tolist() == [0, 1, 2]
    assert fill_holes(torch.tensor([3, 4])).tolist() == [3, 4]
    assert fill_holes(torch.tensor([], dtype=torch.long)).tolist() == []


# --- padding and the KV cache -----------------------------------------------------------------------------


def test_prompts_are_left_padded_template_renderings(policy, tok):
    s = sample(policy, tok, max_new_tokens=2)
    engine = HFEngine(policy, tok)
    assert s.prompt_ids.shape[1] == max(len(engine.encode_prompt(p)) for p in PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        want = chat.encode(tok, chat.render(tok, prompt, add_generation_prompt=True))
        mask = s.prompt_mask[row]
        pad = len(mask) - len(want)
        assert mask.tolist() == [0] * pad + [1] * len(want)
        assert s.prompt_ids[row, pad:].tolist() == want and (s.prompt_ids[row, :pad] == tok.pad_token_id).all()
    ids, mask = s.sequences()
    assert ids.shape == mask.shape == (3, s.prompt_ids.shape[1] + s.response_ids.shape[1])


def test_greedy_equals_argmax_of_uncached_unpadded_forward_passes(policy, tok, backend):
    """The KV cache, the positions of left-padded rows and the attention mask change nothing: each greedy token
    is the argmax of a plain forward pass over that prompt alone plus the tokens so far."""
    s = sample(policy, tok, backend=backend, temperature=0.0, max_new_tokens=6)
    engine = HFEngine(policy, tok)
    for row, prompt in enumerate(PROMPTS):
        ids = engine.encode_prompt(prompt)
        want = []
        with torch.no_grad():
            for _ in range(6):
                want.append(int(policy(torch.tensor([ids + want])).logits[0, -1].argmax()))
        assert s.response_ids[row].tolist() == want


# --- stopping ---------------------------------------------------------------------------------------------


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM that emits a fixed script per row, chosen by the row's prompt length: its logits put
    all the mass on the script's next token, so no sampling noise can change it. Like a real KV cache, its state
    rides in the cache argument (named as the installed transformers names it, `layers.cache_arg`), which the
    engine hands back on the next call, and rows leave it through `batch_select_indices` as they do a transformers
    Cache."""

    def __init__(self, scripts: dict[int, list[int]], vocab_size: int):
        super().__init__()
        self.scripts, self.vocab_size = scripts, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine finds the device through the parameters

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=0, **cache_kwarg):
        cache = cache_kwarg.pop(layers.cache_arg(), None)
        assert not cache_kwarg, cache_kwarg
        if cache is None:
            cache = ScriptCache([self.scripts[int(n)] for n in attention_mask.sum(-1)])
        assert len(input_ids) == len(cache.scripts)
        logits = torch.full((len(input_ids), 1, self.vocab_size), -1e9)
        for row, script in enumerate(cache.scripts):
            logits[row, 0, script[min(cache.step, len(script) - 1)]] = 0.0
        cache.step += 1
        return SimpleNamespace(logits=logits, **{layers.cache_arg(): cache})


class ScriptCache:
    def __init__(self, scripts: list[list[int]]):
        self.scripts, self.step = scripts, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.scripts = [self.scripts[i] for i in indices.tolist()]


def test_stops_at_end_of_turn_or_eos_and_flags_rows_cut_at_max_new_tokens(tok):
    hello, world, bang = (tok.encode(w, add_special_tokens=False)[0] for w in ("Hello", " world", "!"))
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert chat.end_of_turn_ids(tok) == {im_end, endoftext}  # im_end is also SmolLM2's eos
    lengths = [len(HFEngine(None, tok).encode_prompt(p)) for p in PROMPTS]
    scripts = {lengths[0]: [hello, world, im_end, bang],  # the template's end-of-turn token after two tokens
               lengths[1]: [hello, world, bang, world, bang, world, bang],  # never stops: cut at max_new_tokens
               lengths[2]: [endoftext, hello]}  # <|endoftext|> at once: an empty response
    engine = HFEngine(ScriptedLM(scripts, len(tok)), tok, batch_size=3)
    s = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=0))
    pad = tok.pad_token_id
    assert s.finished.tolist() == [True, False, True]
    assert s.response_ids.tolist() == [[hello, world, im_end, pad, pad], [hello, world, bang, world, bang],
                                       [endoftext, pad, pad, pad, pad]]
    assert s.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert s.response_lengths.tolist() == [3, 5, 1]
    assert s.texts == ["Hello world", "Hello world! world!", ""]  # the stop token is not part of the text


def test_max_new_tokens_caps_every_row_of_a_real_model(policy, tok, backend):
    s = sample(policy, tok, backend=backend, n=2, max_new_tokens=5, seed=0)
    stops = torch.tensor(sorted(chat.end_of_turn_ids(tok)))
    assert s.response_ids.shape[1] <= 5 and (s.response_lengths <= 5).all()
    for k in range(len(s.texts)):
        tokens = s.response_ids[k, :int(s.response_lengths[k])]
        assert bool(s.finished[k]) == bool(torch.isin(tokens[-1:], stops).any())
        assert not torch.isin(tokens[:-1], stops).any()  # nothing is sampled after a stop token
        assert bool(s.finished[k]) or len(tokens) == 5


# --- the sampler --------------------------------------------------------------------------------------------


def test_sample_tokens_hand_worked():
    """p = (0.5, 0.3, 0.2), logits = log p. Gumbel-max picks argmax(logits / T + g):
    - g = (0, 0.6, 0), T = 1: scores (−0.693, −0.604, −1.609) -> token 1
    - same g, T = 0.5: scores (−1.386, −2.408 + 0.6 = −1.808, −3.219) -> token 0
    - g = (0, 0, 5), T = 1: token 2 (−1.609 + 5 = 3.391); with top_p = 0.8 the nucleus is {0, 1} (the mass before
      token 2 is 0.8, which already reaches 0.8), so token 0 (−0.693 > −1.204)
    - g = (0, 0.6, 0), top_p = 0.5: the nucleus is {0} -> token 0
    - T = 0: argmax, no noise needed -> token 0."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g1, g2 = torch.tensor([[0.0, 0.6, 0.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    assert sample_tokens(logits, g1, 1.0, 1.0).tolist() == [1]
    assert sample_tokens(logits, g1, 0.5, 1.0).tolist() == [0]
    assert sample_tokens(logits, g2, 1.0, 1.0).tolist() == [2]
    assert sample_tokens(logits, g2, 1.0, 0.8).tolist() == [0]
    assert sample_tokens(logits, g1, 1.0, 0.5).tolist() == [0]
    assert sample_tokens(logits, None, 0.0, 1.0).tolist() == [0]


@pytest.mark.parametrize("temperature,top_p,want", [
    (1.0, 1.0, [0.5, 0.3, 0.2]),
    (1.0, 0.8, [0.625, 0.375, 0.0]),  # the nucleus {0, 1}, renormalised
    (2.0, 1.0, [math.sqrt(x) / sum(math.sqrt(y) for y in (0.5, 0.3, 0.2)) for x in (0.5, 0.3, 0.2)]),
])
def test_sample_tokens_draws_from_the_tempered_nucleus(temperature, top_p, want):
    draws = 40_000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(draws, 3)
    u = torch.rand(draws, 3, generator=torch.Generator().manual_seed(0))
    tokens = sample_tokens(logits, -torch.log(-torch.log(u)), temperature, top_p)
    freq = torch.bincount(tokens, minlength=3).double() / draws
    assert freq.tolist() == pytest.approx(want, abs=0.01)  # ~4 standard errors


@pytest.mark.parametrize("temperature,top_p,k", [(1.0, 1.0, 3), (0.7, 1.0, 1), (1.0, 0.9, 3), (1.5, 1.0, 20)])
def test_topk_sampler_draws_from_the_same_distribution_as_full_gumbel_max(temperature, top_p, k):
    """k + 1 draws per row, the tail drawn as one Gumbel: the frequencies match softmax over the nucleus, also for
    tokens outside the k candidates (k = 1 sends a third of the draws through the tail path)."""
    draws = 30_000
    logits = torch.log(torch.tensor([0.30, 0.20, 0.12, 0.10, 0.08, 0.07, 0.05, 0.04, 0.03, 0.01])).expand(draws, 10)
    rngs = [np.random.default_rng([7, i]) for i in range(draws)]
    tokens = sample_tokens_topk(logits, rngs, temperature, top_p, k=k)
    freq = torch.bincount(tokens, minlength=10).double() / draws
    want = tempered(logits[:1], temperature, top_p).softmax(-1)[0].double()
    assert freq.tolist() == pytest.approx(want.tolist(), abs=0.012)  # ~4 standard errors at p = 0.3
    # per-row streams: the same rows give the same tokens
    again = sample_tokens_topk(logits[:50], [np.random.default_rng([7, i]) for i in range(50)], temperature, top_p,
                               k=k)
    assert torch.equal(again, tokens[:50])


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_new_tokens=0), dict(seed=-1)])
def test_invalid_sampling_params_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--" + next(iter(bad)).replace("_", "-")):
        SamplingParams(**bad)
