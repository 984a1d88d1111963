"""SFT on the tiny model: parameters change, loss falls, resume is bit-exact, errors are clear."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import TrainingError, models
from rlhfkit.algos import sft
from rlhfkit.tracking import read_metrics

from tests.conftest import (launch_and_kill, needs_native_bf16, rewind, run_accelerate, run_cli, run_distributed,
                            train_losses)


def base_cfg(tmp_path: Path, **kw) -> sft.SFTConfig:
    defaults = dict(model="tiny-llama", data="sample:conversations", output=str(tmp_path / "out"), max_steps=4,
                    batch_size=4, lr=1e-3, val_fraction=0.0, warmup_ratio=0.0, dtype="fp32", max_length=256)
    defaults.update(kw)
    return sft.SFTConfig(**defaults)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def initial_weights(tok) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok).state_dict().items()}


def test_every_trainable_parameter_changes(tmp_path, tok):
    before = initial_weights(tok)
    sft.train(base_cfg(tmp_path, max_steps=2))
    after = weights(tmp_path / "out")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_freeze_layers_changes_only_the_rest(tmp_path, tok):
    before = initial_weights(tok)
    sft.train(base_cfg(tmp_path, max_steps=2, freeze_layers=1))
    after = weights(tmp_path / "out")
    frozen = {k for k in before if k.startswith(("model.embed_tokens", "model.layers.0."))}
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in before if k not in frozen)


def test_lora_trains_every_adapter_weight_and_merges(tmp_path, tok):
    cfg = base_cfg(tmp_path, max_steps=2, lora=True, lora_r=4, merge=True)
    sft.train(cfg)
    out = tmp_path / "out"
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero in LoRA
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = initial_weights(tok)
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_a_lora_adapter_records_a_base_that_loads_elsewhere(tmp_path, tok, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    short = dict(max_steps=2, lora=True, lora_r=4, batch_size=2, max_length=64)
    sft.train(base_cfg(tmp_path, **short))  # tiny-llama has no hub id: the alias, and how rlhfkit builds it
    record = json.loads((tmp_path / "out" / models.BASE_RECORD).read_text())
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert record["rlhfkit_model"] == "tiny-llama" and record["seed"] == 0
    # a relative --model directory is recorded as its absolute path, so the adapter loads from any directory
    models.load_causal_lm("tiny-llama", seed=3, tokenizer=tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    sft.train(base_cfg(tmp_path, model="base", output="rel", **short))
    monkeypatch.chdir(tmp_path / "out")
    adapter = tmp_path / "rel"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "base").resolve())
    ids = torch.tensor([[1, 5, 9, 2]])
    by_hand = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter).eval()
    by_itself = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # finds the base from the record alone
    by_rlhfkit = models.load_causal_lm(str(adapter), tokenizer=tok).eval()  # the base as rlhfkit loads it, merged
    with torch.no_grad():
        logits = by_hand(ids).logits
        assert torch.equal(logits, by_itself(ids).logits)
        assert torch.allclose(logits, by_rlhfkit(ids).logits, atol=1e-5)
        with by_hand.disable_adapter():
            assert not torch.allclose(logits, by_hand(ids).logits)  # the trained adapter is in there


def test_loss_falls_on_a_tiny_overfit_set(tmp_path):
    data = tmp_path / "tiny.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say the word {w}."},
                          {"role": "assistant", "content": f"{w} {w} {w}."}]} for w in ("apple", "river", "stone", "cloud")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    final = sft.train(base_cfg(tmp_path, data=str(data), max_steps=40, lr=1e-2, schedule="constant"))
    losses = train_losses(tmp_path / "out")
    assert losses[-1] < 0.3 * losses[0], losses
    assert final["train/steps"] == 40


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_two_plus_two_equals_four_bit_exact(tmp_path, group_by_length):
    straight = base_cfg(tmp_path, output=str(tmp_path / "straight"), grad_accum=2, batch_size=2,
                        group_by_length=group_by_length)
    sft.train(straight)
    # a 4-step run that checkpoints at step 2; rewinding it to that checkpoint leaves exactly what a run
    # stopped after 2 steps leaves (the SIGKILL test below kills a real process)
    split = replace(straight, output=str(tmp_path / "split"), save_steps=2)
    sft.train(split)
    rewind(tmp_path / "split", 2)
    sft.train(replace(split, resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the steps the interrupted run logged after its checkpoint are logged once, by the resumed run
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    steps = lambda run: [m["step"] for m in read_metrics(tmp_path / run)]  # noqa: E731
    assert steps("split") == steps("straight")


@needs_native_bf16
def test_bf16_resume_is_bit_exact_too(tmp_path):
    cfg = base_cfg(tmp_path, output=str(tmp_path / "a"), dtype="bf16", max_steps=3)
    sft.train(cfg)
    sft.train(replace(cfg, output=str(tmp_path / "b"), save_steps=1))
    ckpts = tmp_path / "b" / "checkpoints"
    (ckpts / "latest").write_text("step-0000002")
    sft.train(replace(cfg, output=str(tmp_path / "b"), resume=True))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 30 s; the 2+2 = 4 resume tests of every trainer stay in the default run
def test_sigkill_mid_training_resumes_to_same_weights(tmp_path):
    args = ["sft", "--model", "tiny-llama", "--max-steps", "12", "--batch-size", "2", "--lr", "1e-3",
            "--dtype", "fp32", "--val-fraction", "0", "--max-length", "128", "--save-steps", "2"]
    run_cli(*args, "--output", str(tmp_path / "straight"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-0000004").is_dir():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    run_cli(*args, "--output", str(out), "--resume")
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_data_parallel_matches_one_process(tmp_path):
    # 9 rows, global batch 4: the third step has one row, so the second process has none (weight-0 row)
    data = tmp_path / "nine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i + 1)))})
                            + "\n" for i in range(9)))
    common = ["--model", "tiny-llama", "--data", str(data), "--max-steps", "3", "--lr", "1e-3", "--dtype", "fp32",
              "--val-fraction", "0", "--max-length", "128", "--warmup-ratio", "0"]
    run_cli("sft", *common, "--batch-size", "4", "--output", str(tmp_path / "one"))
    run_accelerate(2, "sft", *common, "--batch-size", "2", "--output", str(tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    # Adam divides by sqrt(v): where a gradient is ~0, float rounding of the gradient sum (two partial sums
    # vs one) can move a weight by a fraction of one lr-sized step; 1e-4 is a tenth of such a step
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    la = train_losses(tmp_path / "one")
    lb = train_losses(tmp_path / "two")
    assert la == pytest.approx(lb, rel=1e-5)


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # an absurd learning rate blows the weights up after the first update, so step 2's loss is not finite
    cfg = base_cfg(tmp_path, lr=1e30, max_grad_norm=0.0, save_steps=1, max_steps=4)
    with pytest.raises(TrainingError, match=r"non-finite .* at step 2 .*last good checkpoint: .*step-0000001"):
        sft.train(cfg)
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000001"
    assert all(torch.isfinite(v).all() for v in load_file(ckpts / "step-0000001" / "trainable.safetensors").values())


def test_skip_nonfinite_skips_and_counts(tmp_path):
    cfg = base_cfg(tmp_path, lr=1e30, max_grad_norm=0.0, max_steps=4, skip_nonfinite=3)
    final = sft.train(cfg)
    assert final["train/nonfinite_skipped"] == 3


def test_final_directory_loads_with_plain_transformers(tmp_path, tok):
    sft.train(base_cfg(tmp_path, max_steps=1))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    t = AutoTokenizer.from_pretrained(out)
    assert t.chat_template == tok.chat_template
    ours = weights(out)
    assert all(torch.equal(model.state_dict()[k], ours[k]) for k in ours)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model"] == "tiny-llama" and run["seed"] == 0 and "torch" in run["versions"]
    assert run["final_metrics"]["train/steps"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent/data.jsonl"], "data file not found"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--lerning-rate", "1"], "did you mean"),
    (["--data", "BAD"], "bad.jsonl:2: not valid JSON"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, msg):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    args = [str(bad) if a == "BAD" else a for a in args]
    proc = run_cli("sft", "--model", "tiny-llama", "--output", str(tmp_path / "o"), *args, check=False)
    assert proc.returncode != 0
    assert msg in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 or proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_cli_template_error(tmp_path, tok):
    model_dir = tmp_path / "badtemplate"
    models.load_causal_lm("tiny-llama", tokenizer=tok).save_pretrained(model_dir)
    bad = tok.__class__.from_pretrained(tok.name_or_path)
    bad.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    bad.save_pretrained(model_dir)
    proc = run_cli("sft", "--model", str(model_dir), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "breaks the prefix property" in proc.stderr and str(model_dir) in proc.stderr


FSDP_RUN = ["sft", "--model", "tiny-llama", "--data", "sample:conversations", "--lr", "1e-3", "--dtype", "fp32",
            "--val-fraction", "0.2", "--batch-size", "2", "--grad-accum", "2", "--warmup-ratio", "0"]


@pytest.mark.slow  # the default run keeps tests/test_distributed.py (FSDP2 = DDP, resumed from sharded checkpoints)
def test_fsdp2_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    args = [*FSDP_RUN, "--max-steps", "10", "--save-steps", "2", "--sharding", "fsdp2"]
    run_distributed(2, *args, "--output", str(tmp_path / "straight"))
    out = tmp_path / "killed"
    launch_and_kill(2, [*args, "--output", str(out)], out / "checkpoints" / "step-0000002")
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    assert (out / "checkpoints" / "step-0000002" / "shards").is_dir()
    run_distributed(2, *args, "--output", str(out), "--resume")
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(out) == train_losses(tmp_path / "straight")
