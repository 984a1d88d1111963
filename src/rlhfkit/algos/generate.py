"""`rlhfkit generate`: n sampled responses per prompt, through the rollout engine that best-of-n and PPO share.

One run, top to bottom:
  1. read the prompts (any format with a prompt: prompts, conversations ending with a user turn, pairs, ...)
  2. load the model and its tokenizer (chat template) onto the GPU if there is one
  3. sample with `rollout.hf.HFEngine`: chat template with generation prompt, left-padded batches, KV cache,
     temperature / top-p, stop at EOS or end-of-turn, row (i, j) seeded by (seed, i, j)
  4. write one JSON line per sample, with the generation settings, and OUTPUT.run.json beside it

`rollout.sampling.sample` (steps 1–3) is also best-of-n's first step, so best-of-n with n=1 is this command
with the same seed.

Outputs and departures from the other commands (docs/algorithms/sampling.md):
- The output is a file, not a directory, so the run record is written beside it as OUTPUT with the suffix
  `.run.json` (samples.jsonl -> samples.run.json): runs that write into one folder, or into a model directory
  that has its own run.json, never overwrite each other's. There is no training loop, so no metrics.jsonl or
  TensorBoard events: the final metrics are in the run record and printed.
- tiny-llama's random weights are always drawn from seed 0 (`rlhfkit sft`'s default), so `--seed` changes the
  samples, never the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config import write_run_record
from rlhfkit.data import io
from rlhfkit.rollout.sampling import SamplingConfig, generation_settings, sample, sample_rows
from rlhfkit.tracking import check_output


@dataclass
class GenerateConfig(SamplingConfig):
    """rlhfkit generate: sample n responses per prompt (batched, seeded) into a JSON Lines file."""

    model: str = "smollm2-135m"
    """Model to sample from: an alias (smollm2-135m, tiny-llama), a Hugging Face directory, a .gguf file or a hub id."""
    output: str = "samples.jsonl"
    """Output JSON Lines file, one row per sample; the run record goes beside it as OUTPUT with suffix .run.json."""


def generate(cfg: GenerateConfig) -> dict[str, float]:
    check_output(cfg.output)
    prompts, _, samples, metrics = sample(cfg, cfg.model)
    # 4. one row per sample, and the run record
    io.write_jsonl(cfg.output, sample_rows(prompts, samples, generation_settings(cfg, cfg.model)))
    write_run_record(cfg.output, cfg, "generate", metrics)
    return metrics
