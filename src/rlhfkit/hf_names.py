"""transformers' TrainingArguments and TRL's config names, as `config` reads them.

People arrive with TRL commands and YAML files. A name whose meaning is ours is read as our option (and said so on
stderr, once); a name whose meaning differs is refused with our nearest option and how it differs, because a silent
near-match would train something other than what the user asked for.
"""

from __future__ import annotations

import dataclasses

TRAINERS = ("SFTConfig", "RMConfig", "DPOConfig", "PPOConfig")
DATA_TRAINERS = ("SFTConfig", "RMConfig", "DPOConfig")  # passes over a fixed data set, as transformers' Trainer


@dataclasses.dataclass(frozen=True)
class Alias:
    """A transformers/TRL name that means what one of our options means."""

    options: tuple[str, ...]
    """Our option it is read as: the first of these the command has (model_name_or_path: --model, ppo's --policy)."""
    only: tuple[str, ...] = ()
    """The config classes where the two meanings agree; empty: every command with the option."""
    flag_for: str | None = None
    """A true/false flag that stands for one value of our option (bf16: --dtype bf16)."""


ALIASES: dict[str, Alias] = {
    "learning_rate": Alias(("lr",)),
    "model_name_or_path": Alias(("model", "policy")),
    "sft_model_path": Alias(("policy",), only=("PPOConfig",)),
    "per_device_train_batch_size": Alias(("batch_size",), only=DATA_TRAINERS),
    "gradient_accumulation_steps": Alias(("grad_accum",)),
    "num_train_epochs": Alias(("epochs",)),
    # where --output is a directory; generate, score and best-of-n write a file
    "output_dir": Alias(("output",), only=(*TRAINERS, "EvalConfig", "PipelineConfig", "ExportConfig")),
    "logging_steps": Alias(("log_steps",)),
    "max_seq_length": Alias(("max_length",), only=DATA_TRAINERS),
    "bf16": Alias(("dtype",), flag_for="bf16"),
    "fp16": Alias(("dtype",), flag_for="fp16"),
    "use_peft": Alias(("lora",)),
    "lora_target_modules": Alias(("lora_targets",)),
    "loss_type": Alias(("loss",), only=("DPOConfig",)),
    "num_ppo_epochs": Alias(("ppo_epochs",)),
    "cliprange": Alias(("clip_eps",)),
    "cliprange_value": Alias(("value_clip",)),
    "response_length": Alias(("max_new_tokens",)),
    "max_completion_length": Alias(("max_new_tokens",)),
    "num_generations": Alias(("n_samples", "n")),
}

PPO = "rollout_prompts"  # a field only ppo has: entries under it speak of ppo
# transformers/TRL names whose meaning is none of our options' -> (a field the command must have, what to say): the
# first entry whose field the command has is the error's hint
MEANINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "per_device_train_batch_size": ((PPO, "ppo's --batch-size is the micro-batch of its training passes, as TRL's, "
                                          "but a rollout is --rollout-prompts × --n-samples rows, not a multiple of "
                                          "it"),),
    "gradient_accumulation_steps": ((PPO, "ppo has no --grad-accum: an optimizer step takes --minibatch-size rows, "
                                          "--batch-size at a time"),),
    "num_mini_batches": ((PPO, "ppo sets the rows of an optimizer step, --minibatch-size, not the number of "
                               "minibatches in a rollout"),),
    "num_train_epochs": ((PPO, "ppo runs --iterations rollouts of --rollout-prompts prompts each; --ppo-epochs is "
                               "the passes over each rollout"),),
    "max_steps": ((PPO, "ppo runs --iterations rollouts, each followed by its update"),),
    "total_episodes": ((PPO, "ppo runs --iterations rollouts of --rollout-prompts prompts × --n-samples responses "
                             "(episodes = their product)"),),
    "max_seq_length": ((PPO, "ppo's --max-length is the longest prompt (longer ones are skipped and counted); "
                             "--max-new-tokens is the longest response"),),
    "max_prompt_length": ((PPO, "ppo's --max-length is the longest prompt (longer ones are skipped and counted)"),
                          ("max_length", "--max-length caps the whole sequence (prompt and response), keeping its "
                                         "start; there is no separate prompt limit")),
    "beta": (("kl_coef", "ppo's KL penalty is --kl-coef, per token in the reward, where GRPO's beta weighs a KL "
                         "term in the loss"),),
    "whiten_rewards": (("whiten_advantages", "rlhfkit whitens the advantages (--whiten-advantages, on) and can "
                                             "divide the scores by their standard deviation (--scale-scores)"),),
    "reward_model_path": (("reward_model", "--reward-model takes the output of `rlhfkit rm`: a one-label sequence "
                                           "classifier whose recorded normalisation is applied"),),
    "use_vllm": (("engine", "--engine vllm samples with vLLM (hf: rlhfkit's own sampler; auto: vLLM where it is "
                            "installed on a GPU)"),),
    "output_dir": (("output", "this command's --output is a file, not a directory"),),
    "lr_scheduler_type": (("schedule", "--schedule cosine, linear or constant decays to --min-lr-ratio × the peak "
                                       "(0.1 by default; transformers decays to 0: add --min-lr-ratio 0), after "
                                       "--warmup-ratio of the steps"),),
    "warmup_steps": (("warmup_ratio", "--warmup-ratio is a fraction of the optimizer steps, not a count"),),
    "torch_dtype": (("dtype", "--dtype is the precision of the maths under autocast (auto, bf16, fp16, fp32); the "
                              "weights stay fp32, where torch_dtype loads them in that dtype"),),
    "resume_from_checkpoint": (("resume", "--resume is a flag: it continues from OUTPUT/checkpoints/latest, not "
                                          "from a path"),),
    **dict.fromkeys(["adam_beta1", "adam_beta2"],
                    (("adam_betas", "both betas are one option: --adam-betas 0.9 0.95"),)),
    "optim": (("adam_betas", "the optimizer is always AdamW (torch's fused kernel), set by --adam-betas and "
                             "--weight-decay"),),
    **dict.fromkeys(["eval_strategy", "evaluation_strategy"],
                    (("eval_steps", "--eval-steps N evaluates every N steps (0: only at the end)"),)),
    "save_strategy": (("save_steps", "--save-steps N writes a resumable checkpoint every N steps (0: only the "
                                     "final model)"),),
    "report_to": (("log_steps", "metrics always go to OUTPUT/metrics.jsonl and TensorBoard events in OUTPUT; "
                                "there is no other tracker"),),
    "precompute_ref_log_probs": (("ref_mode", "--ref-mode precomputed, the default without --lora"),),
    "dataset_name": (("data", "--data is a local file, a save_to_disk directory or sample:NAME; rlhfkit downloads "
                              "no data set (save a hub one with datasets' save_to_disk first)"),
                     ("prompts", "--prompts is a local file, a save_to_disk directory or sample:NAME; rlhfkit "
                                 "downloads no data set (save a hub one with datasets' save_to_disk first)")),
}
