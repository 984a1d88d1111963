"""Child process of compare_trl.py: one TRL 1.16 training run (SFT, reward model, DPO or GRPO), timed from inside.

Run by the harness, one process per run, so that ru_maxrss (peak resident memory) belongs to this run alone:

    python benchmarks/trl_side.py SPEC.json      # SPEC: what compare_trl.py's `trl_spec` writes

TRL is used as a user would use it: the trainer class with a path to a local Hugging Face directory (no hub access),
a `datasets` JSONL file in TRL's own conversational formats, and its defaults wherever the comparison does not
need a setting pinned (gradient checkpointing stays on, TRL 1.16's default). The precision is the spec's "dtype":
"bf16" gives bf16=True (autocast over the fp32 weights), "fp32" bf16=False; spec files written before the harness
had --dtype have none and mean bf16. Two things are added from outside,
neither of which changes what TRL computes:
- a TrainerCallback that stamps time.perf_counter() at every step's begin and end (and keeps the logs);
- a subclass whose compute_loss records the loss it returns, unrounded (Trainer logs round to 4 digits, too
  coarse for the DPO step-1 check against ln 2).
The result JSON holds the per-step times, losses and token counts, the processed sequences (so the harness can
check that TRL trained the very tokens rlhfkit trained) and this process's peak RSS.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402


def length_target_for_trl(spec: dict):
    """The rlhfkit reward function (fn(prompts, responses, metadata)) with TRL's signature fn(prompts, completions,
    **kwargs); conversational completions arrive as [{"role": "assistant", "content": text}]."""
    path, name = spec["reward_fn"].rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name)

    def reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in fn(prompts, texts, [{} for _ in texts])]

    reward.__name__ = name
    return reward


def recording(trainer_cls, losses: list[float]):
    """`trainer_cls` whose compute_loss also appends every training loss it returns to `losses` (full precision)."""

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self.model.training:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    return Recording


def make_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.tokens_seen, self.logs = [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())
            self.tokens_seen.append(int(state.num_input_tokens_seen))

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({"step": state.global_step, **{k: v for k, v in (logs or {}).items()
                                                            if isinstance(v, (int, float))}})

    return Timer()


def common_args(spec: dict) -> dict:
    """TrainingArguments that make the optimisation equal to rlhfkit's (see compare_trl.py's docstring)."""
    o, dtype = spec["optim"], spec.get("dtype", "bf16")
    if dtype not in ("bf16", "fp32"):
        raise SystemExit(f"spec dtype {dtype!r}: expected bf16 or fp32")
    return dict(
        output_dir=spec["output"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=o["lr"], lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused", adam_beta1=o["betas"][0], adam_beta2=o["betas"][1], adam_epsilon=o["eps"],
        weight_decay=o["weight_decay"], max_grad_norm=o["max_grad_norm"], bf16=dtype == "bf16", use_cpu=True,
        seed=spec["seed"], data_seed=spec["seed"], logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )


def build(spec: dict, losses: list[float]):
    """(trainer, the config's keyword arguments) for spec["algo"], with rlhfkit's load_tokenizer of the same
    directory as the processing class."""
    import trl
    from datasets import load_dataset

    from rlhfkit import models

    data = load_dataset("json", data_files=spec["data"], split="train")
    tok = models.load_tokenizer(spec["model"])
    algo, g = spec["algo"], spec["grpo"]
    counted = {"include_num_input_tokens_seen": "non_padding"}  # GRPO counts prompt + completion tokens itself
    config_cls, trainer_cls, extra = {
        "sft": (trl.SFTConfig, trl.SFTTrainer, dict(max_length=spec["max_length"], assistant_only_loss=True,
                                                    packing=False, **counted)),
        "rm": (trl.RewardConfig, trl.RewardTrainer, dict(max_length=spec["max_length"], **counted)),
        "dpo": (trl.DPOConfig, trl.DPOTrainer, dict(max_length=spec["max_length"], beta=spec["beta"],
                                                    loss_type=["sigmoid"], **counted)),
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer, dict(
            num_generations=g["generations"], max_completion_length=g["new_tokens"], temperature=1.0, top_p=1.0,
            beta=g["beta"], epsilon=g["clip_eps"], num_iterations=1, use_vllm=False)),
    }[algo]
    if algo == "sft":
        # the same template text with {% generation %} markers around each assistant turn's content + <|im_end|>:
        # TRL's assistant_only_loss needs them (SmolLM2's template has none), and they change no rendered character
        tok.chat_template = spec["training_chat_template"]
    kwargs = {"reward_funcs": length_target_for_trl(spec)} if algo == "grpo" else {}
    config_kwargs = {**common_args(spec), **extra}
    trainer = recording(trainer_cls, losses)(model=spec["model"], args=config_cls(**config_kwargs),
                                              train_dataset=data, processing_class=tok, **kwargs)
    return trainer, config_kwargs


def processed_sequences(trainer, algo: str) -> list[dict]:
    """The token ids TRL will train on and which of them carry loss (1) — from its own processed dataset."""
    out = []
    for ex in trainer.train_dataset:
        if algo == "sft":
            out.append({"ids": ex["input_ids"], "mask": [int(x != -100) for x in ex["labels"]]})
        elif algo == "rm":
            out += [{"ids": ex["chosen_ids"]}, {"ids": ex["rejected_ids"]}]
        elif algo == "dpo":
            for side in ("chosen_ids", "rejected_ids"):
                out.append({"ids": ex["prompt_ids"] + ex[side],
                            "mask": [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])})
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    import trl

    losses: list[float] = []
    trainer, config_kwargs = build(spec, losses)
    timer = make_timer()
    trainer.add_callback(timer)
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "trl_version": trl.__version__,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "trainer": type(trainer).__mro__[1].__name__, "config": type(trainer.args).__name__,
        "config_kwargs": {k: v for k, v in config_kwargs.items() if k != "output_dir"},
        "setup_s": t_train - T_START, "train_s": t_end - t_train, "wall_s": t_end - T_START,
        "step_begin": [t - t_train for t in timer.begin], "step_end": [t - t_train for t in timer.end],
        "tokens_seen": timer.tokens_seen, "logs": timer.logs, "losses": losses,
        "sequences": processed_sequences(trainer, spec["algo"]),
        "peak_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10,
        "threads": torch.get_num_threads(),
    }
    Path(spec["result"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
