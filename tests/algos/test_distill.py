"""Context distillation on tiny-llama: the held-out KL(prompted ‖ unprompted) falls, every trainable weight moves,
the two views of a sample share their response tokens, resume gives the uninterrupted run, 2 processes give 1."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import UsageError, models
from rlhfkit.algos import distill
from rlhfkit.tracking import read_metrics

from tests.conftest import rewind, run_accelerate, run_cli, train_losses, write_jsonl

CONTEXT = "You are a pirate. Every answer starts with 'Arr' and ends with 'matey'."


def prompts(tmp_path: Path, n: int = 12) -> str:
    topics = ["the sea", "bread", "rain", "a map", "the moon", "ships", "gold", "parrots", "rope", "wind", "islands",
              "fish", "sails", "stars", "a storm", "the tide"]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {t}."} for t in topics[:n]])


def base_cfg(tmp_path: Path, **kw) -> distill.DistillConfig:
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    defaults = dict(model="tiny-llama", context=str(context), prompts=prompts(tmp_path), output=str(tmp_path / "out"),
                    n=2, max_new_tokens=12, max_steps=4, batch_size=4, lr=1e-3, warmup_ratio=0.0, dtype="fp32",
                    val_fraction=0.25, max_length=256, engine="hf")
    defaults.update(kw)
    return distill.DistillConfig(**defaults)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_the_two_views_share_the_response_and_only_the_teacher_sees_the_context(tok):
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "response": "Hello there.", "prompt_index": 0}]
    (ex,), too_long = distill.tokenize(tok, rows, CONTEXT, 256, "s.jsonl")
    trained = lambda e: [t for t, m in zip(e.input_ids, e.loss_mask) if m]  # noqa: E731
    assert too_long == 0 and trained(ex.student) == trained(ex.teacher)
    assert tok.decode(trained(ex.student)) == "Hello there.<|im_end|>"
    assert "pirate" in tok.decode(ex.teacher.input_ids) and "pirate" not in tok.decode(ex.student.input_ids)
    # a prompt's own system message follows the context in one system message
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert distill.with_context(system, "C")[0] == {"role": "system", "content": "C\n\nBe brief."}
    # a teacher sequence longer than --max-length is left out and counted, never cut
    assert distill.tokenize(tok, rows, CONTEXT, 20, "s.jsonl") == ([], 1)


def test_heldout_kl_falls_by_half_and_every_weight_moves(tmp_path, tok):
    before = {k: v.clone() for k, v in models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok).state_dict().items()}
    cfg = base_cfg(tmp_path, max_steps=30, eval_steps=10, lr=2e-3)
    final = distill.train(cfg)
    kls = [m["val/kl"] for m in read_metrics(tmp_path / "out") if "val/kl" in m]
    assert len(kls) == 4 and kls[0] > 1e-3  # at step 0 the context moves the distributions (a random model: a little)
    assert kls[-1] <= 0.5 * kls[0], kls
    assert final["val/kl"] == kls[-1]
    after = weights(tmp_path / "out")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all("pirate" not in json.dumps(s["prompt"]) for s in samples)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["data"]["data/val_examples"] == 6 and record["data"]["data/examples"] == 18


def test_resume_two_plus_two_equals_four_bit_exact(tmp_path):
    straight = base_cfg(tmp_path, output=str(tmp_path / "straight"))
    distill.train(straight)
    split = replace(straight, output=str(tmp_path / "split"), save_steps=2)
    distill.train(split)
    rewind(tmp_path / "split", 2)
    distill.train(replace(split, resume=True))  # reads its samples back, takes up at step 2
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")


def test_two_processes_give_the_one_process_result(tmp_path):
    cfg = base_cfg(tmp_path, max_steps=3)
    common = ["--model", "tiny-llama", "--context", cfg.context, "--prompts", cfg.prompts, "--n", "2",
              "--max-new-tokens", "12", "--max-steps", "3", "--lr", "1e-3", "--warmup-ratio", "0", "--dtype", "fp32",
              "--val-fraction", "0.25", "--engine", "hf"]
    # both sample in batches of 2 (the same samples) and step on 4 samples: 2 micro-batches here, 1 per process there
    run_cli("distill-context", *common, "--batch-size", "2", "--grad-accum", "2", "--output", str(tmp_path / "one"))
    # accelerate launch: torchrun's own parser would take --n for an ambiguous abbreviation of its options
    run_accelerate(2, "distill-context", *common, "--batch-size", "2", "--output", str(tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (tmp_path / "two" / "samples.jsonl").read_text()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:  # as SFT's: two partial gradient sums round differently from one
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    # a KL of ~1e-3 is a difference of near-equal log-probs: its rounding shows at 1e-4 relative, 1e-7 absolute
    assert train_losses(tmp_path / "one") == pytest.approx(train_losses(tmp_path / "two"), abs=1e-6)


def test_the_shipped_context_and_a_missing_one():
    assert "helpful, honest and harmless" in distill.read_context("hhh")
    with pytest.raises(UsageError, match=r"--context 'nope': no such file, and no shipped context of that name "
                                         r"\(hhh\)"):
        distill.read_context("nope")
