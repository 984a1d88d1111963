"""Several processes (torchrun, gloo, 2 CPU processes): FSDP2 and DeepSpeed ZeRO sharding against DDP for the
trainers with a fixed data set. PPO's data-parallel tests are in tests/algos/test_ppo.py."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import needs_devices, rewind, run_cli, run_distributed, train_losses

DATA = {"sft": "sample:conversations", "dpo": "sample:pairs", "rm": "sample:pairs"}


LORA = ["--lora", "--lora-r", "4"]


# SFT stands for the others in the default run: the same plumbing (distributed.prepare_model, micro_batches,
# sharded checkpoints, the gathered save)
@pytest.mark.parametrize("command,extra", [("sft", []), pytest.param("dpo", [], marks=pytest.mark.slow),
                                           pytest.param("rm", [], marks=pytest.mark.slow),
                                           pytest.param("sft", LORA, marks=pytest.mark.slow),
                                           pytest.param("dpo", LORA, marks=pytest.mark.slow)])
def test_fsdp2_trains_as_ddp_holds_half_per_process_and_resumes(tmp_path, command, extra):
    # 4 steps of 2 × 2 rows (grad-accum 2) over 2 processes, a checkpoint every 2
    args = [command, "--model", "tiny-llama", "--data", DATA[command], "--max-steps", "4", "--lr", "1e-3",
            "--dtype", "fp32", "--batch-size", "2", "--grad-accum", "2", "--warmup-ratio", "0", "--save-steps", "2",
            *extra]
    saved = "adapter_model.safetensors" if extra else "model.safetensors"
    run_distributed(2, *args, "--output", str(tmp_path / "ddp"))
    run_distributed(2, *args, "--sharding", "fsdp2", "--output", str(tmp_path / "fsdp2"))
    assert train_losses(tmp_path / "fsdp2") == pytest.approx(train_losses(tmp_path / "ddp"), rel=1e-5)
    # the sharded run's model gathered into one plain Hugging Face directory
    a, b = load_file(tmp_path / "ddp" / saved), load_file(tmp_path / "fsdp2" / saved)
    assert a.keys() == b.keys()
    for k in a:  # Adam's 1/sqrt(v) can move a weight whose gradient is ~0 by a fraction of an lr-sized step
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    runs = {run: json.loads((tmp_path / run / "run.json").read_text()) for run in ("ddp", "fsdp2")}
    assert (runs["ddp"]["sharding"], runs["fsdp2"]["sharding"]) == ("ddp", "fsdp2")
    for what in ("parameters", "optimizer"):  # each process holds half of the weights and of AdamW's moments
        held = {run: runs[run]["bytes_per_process"][what] for run in runs}
        assert held["fsdp2"] == pytest.approx(held["ddp"] / 2, rel=0.01), what
    # resumed from the sharded checkpoint of step 2: the uninterrupted run, bit for bit
    shutil.copytree(tmp_path / "fsdp2", tmp_path / "resumed")
    rewind(tmp_path / "resumed", 2)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000002" / "shards").is_dir()
    run_distributed(2, *args, "--sharding", "fsdp2", "--output", str(tmp_path / "resumed"), "--resume")
    c = load_file(tmp_path / "resumed" / saved)
    assert all(torch.equal(b[k], c[k]) for k in b)


# every ZeRO run is in the slow tier (53 s for the smallest, ZeRO-3 SFT on two processes): DeepSpeed is an optional
# backend, and FSDP2, the default one, keeps its tests in the default run
@pytest.mark.parametrize("command,sharding,extra", [pytest.param("sft", "zero3", [], marks=pytest.mark.slow),
                                                    pytest.param("sft", "zero2", [], marks=pytest.mark.slow),
                                                    pytest.param("dpo", "zero3", [], marks=pytest.mark.slow),
                                                    pytest.param("rm", "zero3", [], marks=pytest.mark.slow),
                                                    pytest.param("rm", "zero2", [], marks=pytest.mark.slow),
                                                    pytest.param("sft", "zero3", LORA, marks=pytest.mark.slow)])
def test_deepspeed_zero_trains_as_ddp_splits_adamw_and_resumes(tmp_path, command, sharding, extra):
    # the FSDP2 test's run, with DeepSpeed's engine taking the backward passes and the step
    args = [command, "--model", "tiny-llama", "--data", DATA[command], "--max-steps", "4", "--lr", "1e-3",
            "--dtype", "fp32", "--batch-size", "2", "--grad-accum", "2", "--warmup-ratio", "0", "--save-steps", "2",
            *extra]
    saved = "adapter_model.safetensors" if extra else "model.safetensors"
    run_distributed(2, *args, "--output", str(tmp_path / "ddp"))
    run_distributed(2, *args, "--sharding", sharding, "--output", str(tmp_path / "zero"))
    assert train_losses(tmp_path / "zero") == pytest.approx(train_losses(tmp_path / "ddp"), rel=1e-5)
    a, b = load_file(tmp_path / "ddp" / saved), load_file(tmp_path / "zero" / saved)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    runs = {run: json.loads((tmp_path / run / "run.json").read_text()) for run in ("ddp", "zero")}
    assert runs["zero"]["sharding"] == sharding
    for what in ("parameters", "optimizer"):  # zero2 splits AdamW's moments; zero3 the weights too
        held = {run: runs[run]["bytes_per_process"][what] for run in runs}
        split = what == "optimizer" or sharding == "zero3"
        assert held["zero"] == pytest.approx(held["ddp"] / (2 if split else 1), rel=0.01), what
    # resumed from the engine's checkpoint of step 2: the uninterrupted run, bit for bit
    shutil.copytree(tmp_path / "zero", tmp_path / "resumed")
    rewind(tmp_path / "resumed", 2)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000002" / "shards" / "zero").is_dir()
    run_distributed(2, *args, "--sharding", sharding, "--output", str(tmp_path / "resumed"), "--resume")
    c = load_file(tmp_path / "resumed" / saved)
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow  # the default run keeps the in-process non-finite tests
def test_deepspeed_zero_skips_or_stops_on_a_nonfinite_gradient(tmp_path):
    # lr 1e30 blows the weights up in step 1, so steps 2–4 have non-finite gradients: DeepSpeed's step skips them
    # (counted), and without --skip-nonfinite the run stops at step 2
    args = ["sft", "--model", "tiny-llama", "--data", "sample:conversations", "--max-steps", "4", "--lr", "1e30",
            "--max-grad-norm", "0", "--dtype", "fp32", "--batch-size", "2", "--val-fraction", "0", "--sharding",
            "zero2"]
    run_distributed(2, *args, "--skip-nonfinite", "3", "--output", str(tmp_path / "skipped"))
    run = json.loads((tmp_path / "skipped" / "run.json").read_text())
    assert run["final_metrics"]["train/nonfinite_skipped"] == 3
    proc = run_distributed(2, *args, "--output", str(tmp_path / "stopped"), check=False)
    assert proc.returncode != 0 and re.search(r"non-finite .* at step 2", proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize("config,sharding", [("fsdp2", "fsdp2"),
                                             pytest.param("zero2", "zero2", marks=pytest.mark.slow)])
def test_accelerate_config_launches_sharded_processes(tmp_path, config, sharding):
    needs_devices(2)
    proc = run_cli("sft", "--model", "tiny-llama", "--data", "sample:conversations", "--max-steps", "1", "--dtype",
                   "fp32", "--val-fraction", "0", "--accelerate-config", config, "--num-processes", "2",
                   "--output", str(tmp_path / "out"))
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1])["train/steps"] == 1 and len(lines) == 1, lines  # printed once, by the main process
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["processes"], run["sharding"]) == (2, sharding)


@pytest.mark.parametrize("extra,msg", [
    (["--accelerate-config", "zero7"], "--accelerate-config zero7: no such file .*the names: ddp, fsdp2, zero2, zero3"),
    (["--accelerate-config", "fsdp2", "--sharding", "ddp"], "shards with fsdp2: drop --sharding or pass fsdp2"),
    (["--accelerate-config", "zero3", "--sharding=zero2"], "shards with zero3: drop --sharding or pass zero3"),
    (["--accelerate-config", "DS"], "DeepSpeed ZeRO stage 1; rlhfkit runs stages 2 and 3"),
    (["--accelerate-config", "OFFLOAD"], "DeepSpeed offload of the optimizer is not supported"),
    (["--num-processes", "2"], "--num-processes goes with --accelerate-config"),
    (["--sharding", "fsdp2", "--dtype", "fp16"], "--sharding fsdp2 runs in fp32 or bf16"),
    (["--sharding", "zero2", "--dtype", "fp16"], "--sharding zero2 runs in fp32 or bf16"),
    (["--sharding", "fsdp2", "--lora", "--merge"], "--merge with --sharding fsdp2 is not supported"),
    (["--sharding", "zero3", "--lora", "--merge"], "--merge with --sharding zero3 is not supported")])
def test_accelerate_config_mistakes_are_one_line(tmp_path, extra, msg):
    configs = {"DS": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 1\n",
               "OFFLOAD": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n"
                          "  offload_optimizer_device: cpu\n"}
    for name, text in configs.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    extra = [str(tmp_path / f"{a}.yaml") if a in configs else a for a in extra]
    proc = run_cli("sft", "--model", "tiny-llama", *extra, "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and re.search(msg, proc.stderr.strip().splitlines()[-1]), proc.stderr
