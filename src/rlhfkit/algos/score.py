"""`rlhfkit score`: add a `reward` column to (prompt, response) rows with a reward model from `rlhfkit rm`.

The model is loaded with plain `AutoModelForSequenceClassification` and scores each row at the rightmost non-pad
token of the chat template's rendering, as in training (see algos/reward.py); `--normalize` (default) applies
the offset and scale recorded in config.json, `--normalize false` gives the raw head output, which is what plain
transformers returns.
"""

from __future__ import annotations

from dataclasses import dataclass


from rlhfkit import DataError, models
from rlhfkit.data import formats, io
from rlhfkit.reward_model import encode, load_reward_model, score_sequences
from rlhfkit.tracking import check_output
from rlhfkit.training import accelerator_for


@dataclass
class ScoreConfig:
    """rlhfkit score: add a `reward` column to (prompt, response) rows with a trained reward model."""

    reward_model: str = "runs/rm"
    """Reward-model directory written by `rlhfkit rm` (or any sequence-classification model with num_labels=1)."""
    data: str = "sample:prompt_completion"
    """Rows to score: prompt/completion, prompt/response, conversations (scored whole) or alpaca."""
    output: str = "scored.jsonl"
    """Output JSON Lines file: every input row plus `reward`."""
    format: str | None = None
    """Data format (prompt_response, prompt_completion, conversations, alpaca, ...); detected when not given."""
    normalize: bool = True
    """Apply the model's recorded normalisation, (r − offset) × scale; false gives the raw head output."""
    batch_size: int = 16
    """Rows per forward pass."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer ones keep their start (counted)."""
    dtype: str = "fp32"
    """fp32, or bf16 autocast (auto picks bf16 where the hardware has it)."""



def to_messages(row: io.Row, fmt: str) -> formats.Messages:
    """The conversation to score; prompt/response rows are read like prompt/completion rows."""
    d = row.data
    if fmt == "prompt_response":
        missing = [c for c in ("prompt", "response") if c not in d]
        if missing:
            raise DataError(f"{row.where}: missing column(s) {', '.join(missing)} for prompt/response rows")
        d, fmt = {"prompt": d["prompt"], "completion": d["response"]}, "prompt_completion"
    conv = formats.to_conversation(io.Row(d, row.where), fmt)
    if conv.text is not None:
        raise DataError(f"{row.where}: plain text has no prompt and response to score; give prompt/response rows or "
                        "conversations")
    return conv.messages


def score(cfg: ScoreConfig) -> dict:
    check_output(cfg.output)
    accelerator = accelerator_for(cfg.dtype)
    model, tok, offset, scale = load_reward_model(cfg.reward_model, models.mixed_precision(cfg.dtype))
    model.to(accelerator.device)
    rows = io.read_rows(cfg.data)
    by_columns = cfg.format is None and {"prompt", "response"} <= set(rows[0].data)
    if by_columns or cfg.format == "prompt_response":
        fmt = "prompt_response"
    else:
        fmt = formats.detect_format(rows, cfg.format)
    seqs, truncated = [], 0
    for row in rows:
        ids, full = encode(tok, to_messages(row, fmt), cfg.max_length, row.where)
        seqs.append(ids)
        truncated += full > len(ids)
    raw = score_sequences(model, seqs, tok.pad_token_id, cfg.batch_size, accelerator.autocast, progress=True)
    rewards = (raw - offset) * scale if cfg.normalize else raw
    io.write_jsonl(cfg.output, ({**row.data, "reward": r} for row, r in zip(rows, rewards.tolist())))
    if truncated:
        print(f"data: {truncated} rows truncated to {cfg.max_length} tokens")
    return {"score/rows": len(rows), "score/truncated": truncated, "score/mean_reward": float(rewards.mean())}
