"""`rlhfkit score`: add a `reward` column to (prompt, response) rows, or a `rewards` column (one per response) to
comparisons, with a reward model from `rlhfkit rm`; on comparisons it also reports the model's pair accuracy.

The model is loaded with plain `AutoModelForSequenceClassification` and scores each row at the rightmost non-pad
token of the chat template's rendering, as in training (see algos/reward.py); `--normalize` (default) applies
the offset and scale recorded in config.json, `--normalize false` gives the raw head output, which is what plain
transformers returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from rlhfkit import DataError, models
from rlhfkit.data import formats, io
from rlhfkit.reward_model import encode, load_reward_model, score_sequences
from rlhfkit.tracking import check_output
from rlhfkit.training import accelerator_for


@dataclass
class ScoreConfig:
    """rlhfkit score: add rewards to (prompt, response) rows, or to each response of comparisons, with a trained reward
    model."""

    reward_model: str = "runs/rm"
    """Reward-model directory written by `rlhfkit rm` (or any sequence-classification model with num_labels=1)."""
    data: str = "sample:prompt_completion"
    """Rows to score: prompt/response, prompt/completion, conversations (scored whole) or alpaca rows, each given a
    `reward`; or comparisons (pairs, rankings, scores, HH, OpenAssistant trees), each response given its reward in
    `rewards`, in the row's order (chosen first for pairs)."""
    output: str = "scored.jsonl"
    """Output JSON Lines file: every input row plus `reward`, or `rewards` for comparisons."""
    format: str | None = None
    """Data format (prompt_response, prompt_completion, conversations, alpaca, ...); detected when not given."""
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to rlhfkit's, FILE=OURS (`--columns rating=scores answers=responses`), for a layout
    whose columns are named otherwise; keys inside `completions` objects too."""
    normalize: bool = True
    """Apply the model's recorded normalisation, (r − offset) × scale; false gives the raw head output."""
    batch_size: int = 16
    """Rows per forward pass."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer ones keep their start (counted)."""
    dtype: str = "fp32"
    """fp32, or bf16 autocast (auto picks bf16 where the hardware has it)."""



class Scored(NamedTuple):
    """What `score` reads in one row: the conversations it scores (one; or a comparison's K responses, each after its
    prompt) and, for a comparison, its (winner, loser) pairs as indices into them."""

    conversations: list[formats.Messages]
    pairs: list[tuple[int, int]]


def to_scored(row: io.Row, fmt: str) -> Scored:
    if fmt in formats.COMPARISONS:  # every response, not the best only: a pairs file gives both sides' rewards
        pref = formats.to_preference(row, fmt)
        return Scored([pref.prompt + r for r in pref.responses], pref.pairs)
    conv = formats.to_conversation(row, fmt)
    if conv.text is not None:
        raise DataError(f"{row.where}: plain text has no prompt and response to score; give prompt/response rows or "
                        "conversations")
    return Scored([conv.messages], [])


def score(cfg: ScoreConfig) -> dict:
    check_output(cfg.output)
    accelerator = accelerator_for(cfg.dtype)
    model, tok, offset, scale = load_reward_model(cfg.reward_model, models.mixed_precision(cfg.dtype))
    model.to(accelerator.device)
    rows = formats.rename_columns(io.read_rows(cfg.data), cfg.columns)
    fmt = formats.format_of(rows[0], cfg.format)
    scored, rows = formats.convert_rows(rows, to_scored, fmt, source=cfg.data)  # OpenAssistant trees: one per ranking
    seqs, truncated = [], 0
    for row, s in zip(rows, scored):
        for messages in s.conversations:
            ids, full = encode(tok, messages, cfg.max_length, row.where)
            seqs.append(ids)
            truncated += full > len(ids)
    raw = score_sequences(model, seqs, tok.pad_token_id, cfg.batch_size, accelerator.autocast, progress=True)
    rewards = ((raw - offset) * scale if cfg.normalize else raw).tolist()
    out, agreed, pairs, at = [], 0, 0, 0
    for row, s in zip(rows, scored):
        mine, at = rewards[at:at + len(s.conversations)], at + len(s.conversations)
        if s.pairs:
            out.append({**row.data, "rewards": mine})
            agreed += sum(mine[w] > mine[l] for w, l in s.pairs)
            pairs += len(s.pairs)
        else:
            out.append({**row.data, "reward": mine[0]})
    io.write_jsonl(cfg.output, out)
    if truncated:
        print(f"data: {truncated} sequences truncated to {cfg.max_length} tokens")
    metrics = {"score/rows": len(rows), "score/sequences": len(seqs), "score/truncated": truncated,
               "score/mean_reward": sum(rewards) / len(rewards)}
    if pairs:  # the reward model's accuracy on the file's own comparisons
        metrics |= {"score/pairs": pairs, "score/pair_accuracy": agreed / pairs}
    return metrics
