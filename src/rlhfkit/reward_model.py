"""A reward model at inference: load an `rlhfkit rm` directory, encode (prompt, response) as it was trained, score.

Shared by the RM's trainer (algos/reward.py: encoding, pooling), `rlhfkit score`, best-of-n, PPO and eval.
- The score is read at the last token of the chat template's rendering of prompt + response, where plain
  `AutoModelForSequenceClassification` pools it; the RM's pad token is one the template never writes
  (`set_reward_pad_token`), so padding can never be mistaken for the pooled token.
- `RewardModel.score` applies the recorded normalisation (r − offset) × scale unless told not to. The n samples of
  a prompt share its prefix: it runs once into a KV cache (`score_sequences`, equal up to float rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit import DataError, ModelError, forward, models
from rlhfkit.data import chat
from rlhfkit.data.formats import Messages


# --- encoding -------------------------------------------------------------------------------------------------

PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


def set_reward_pad_token(tok) -> bool:
    """Give the tokenizer a right-side pad token that the chat template never writes; True if one was added.

    SmolLM2 pads with `<|im_end|>`, its end-of-turn token, which every rendered response contains; transformers
    pools at the rightmost token that is not the pad token, so the pad token must never be a real token.
    """
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    written = set(chat.encode(tok, chat.render(tok, probe))) | {tok.eos_token_id}
    vocab = tok.get_vocab()
    usable = [name for name in (tok.pad_token, *PAD_CANDIDATES) if name in vocab and vocab[name] not in written]
    added = not usable
    if added:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    else:
        tok.pad_token = usable[0]
    tok.padding_side = "right"
    return added


def encode(tok, messages: Messages, max_length: int, where: str) -> tuple[list[int], int]:
    """Tokens of the template's rendering of `messages` cut to `max_length` (the score is read at the last one),
    and the length before the cut."""
    ids = chat.encode(tok, chat.render(tok, messages))
    full = len(ids)
    ids = ids[:max_length]
    if ids[-1] == tok.pad_token_id:
        raise DataError(f"{where}: the text ends in the RM's pad token {tok.pad_token!r}, which pools wrongly")
    return ids, full


# --- loading --------------------------------------------------------------------------------------------------


def reward_model_dir(path: str) -> Path:
    """`path` as a directory `rlhfkit rm` wrote, or a ModelError saying what it is instead."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"reward model {p}: no such directory (give the --output of `rlhfkit rm`)")
    if not (p / "config.json").is_file():
        lora = (p / "adapter_config.json").is_file()
        hint = " (a LoRA run: train with --merge and use OUTPUT/merged)" if lora else ""
        raise ModelError(f"{p} is not a reward-model directory (no config.json){hint}")
    return p


def load_reward_model(path: str, precision: str = "no"):
    """(model, tokenizer, offset, scale) of a saved reward model, with plain transformers; loaded to score, so its
    blocks' weights are stored for autocast under `precision` (`models.inference_weights`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = reward_model_dir(path)
    model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ModelError(f"{p} has {model.config.num_labels} labels; a reward model has one")
    tok = AutoTokenizer.from_pretrained(p)
    if tok.pad_token_id is None or tok.pad_token_id != model.config.pad_token_id:
        raise ModelError(f"{p}: the tokenizer's pad token must be set and equal config.pad_token_id "
                         "(rlhfkit rm sets both to a token the chat template never writes)")
    offset = getattr(model.config, "rlhfkit_reward_offset", 0.0) or 0.0
    scale = getattr(model.config, "rlhfkit_reward_scale", 1.0) or 1.0
    models.inference_weights(model, precision)
    return model, tok, offset, scale


# --- scoring --------------------------------------------------------------------------------------------------

# rows of up to this many batches become one `forward.rows` batch: its prompts' prefixes run once, and its rows,
# sorted by length, batch_size at a time, pad little (best-of-16's responses run from 3 to 48 tokens)
GROUP_BATCHES = 4


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int, autocast,
                    groups: Sequence[int] | None = None, progress: bool = False) -> torch.Tensor:
    """Scores (len(seqs),) float64 of token sequences, in input order, batch_size rows per forward.

    With `groups` (each row's prompt: the n samples of a prompt share its tokens, often most of the sequence),
    the rows of whole groups, up to GROUP_BATCHES × batch_size at a time, become one `forward.rows` batch: each
    group's common start (less at least one token) runs once into a KV cache (`forward.score_cache`), and the
    rows' suffixes run on it, shortest first. The same scores as each sequence run whole, up to float rounding
    (tested). Without groups, or for a model `forward.scores` cannot drive on a prefix, every row runs whole.
    """
    model.eval()
    groups = groups if groups is not None and can_share_prefix(model) else None
    out = torch.zeros(len(seqs), dtype=torch.float64)
    bar = tqdm(total=len(seqs), disable=not progress, desc="score", dynamic_ncols=True)
    for part in parts(seqs, groups, GROUP_BATCHES * batch_size):
        batch = forward.rows([forward.Row(seqs[i], [0] * len(seqs[i])) for i in part], pad_id,
                             None if groups is None else [groups[i] for i in part])
        lengths = batch.attention_mask.sum(1).tolist()
        order = sorted(range(len(part)), key=lambda k: lengths[k])
        with autocast():
            cache = None if batch.prefix is None else forward.score_cache(model, batch.prefix)
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                scores = forward.scores(model, batch.take(idx), cache, short_math_attention=False)
                out[[part[k] for k in idx]] = scores.double().cpu()
                bar.update(len(idx))
    bar.close()
    return out


def parts(seqs: list[list[int]], groups: Sequence[int] | None, size: int) -> list[list[int]]:
    """Row indices cut into parts of about `size` rows: whole groups in order of appearance (a group larger than
    `size` alone), or without groups the rows sorted by length, so that a part's rows pad little."""
    if groups is None:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[i:i + size] for i in range(0, len(order), size)]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out: list[list[int]] = []
    for rows in members.values():
        if out and len(out[-1]) + len(rows) <= size:
            out[-1] += rows
        else:
            out.append(list(rows))
    return out


def can_share_prefix(model) -> bool:
    """A plain transformers sequence-classification model with a `score` head (not DDP- or peft-wrapped):
    `forward.scores` can run it on a prefix."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and hasattr(model, "score") and model.base_model is not model


@dataclass
class RewardModel:
    """A reward model loaded from an `rlhfkit rm` directory, ready to score (prompt, response) text."""

    model: Any
    tokenizer: Any
    offset: float
    scale: float
    precision: str = "no"  # the autocast precision its blocks' weights are stored in (`models.inference_weights`)

    @classmethod
    def load(cls, path: str, device: torch.device, precision: str = "no") -> RewardModel:
        """The model of `path` on `device`, its blocks' weights stored for scoring under `precision` (every
        `score` call must then use that precision)."""
        model, tok, offset, scale = load_reward_model(path, precision)
        return cls(model.to(device), tok, offset, scale, precision if precision in models.AUTOCAST_DTYPES else "no")

    def score(self, prompts: list[Messages], responses: list[str], batch_size: int, max_length: int,
              precision: str, normalize: bool = True, groups: Sequence[int] | None = None
              ) -> tuple[torch.Tensor, int]:
        """(N,) float64 scores, normalised unless told otherwise, and how many sequences were truncated.
        `groups`: each row's prompt (`Samples.prompt_index`), whose tokens then run once (`score_sequences`)."""
        if self.precision != "no" and precision != self.precision:
            raise ValueError(f"this reward model was loaded for {self.precision} scoring, not {precision}")
        seqs, truncated = [], 0
        for k, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, full = encode(self.tokenizer, prompt + [{"role": "assistant", "content": response}], max_length,
                               f"sample {k}")
            seqs.append(ids)
            truncated += full > len(ids)
        cast = functools.partial(models.autocast, next(self.model.parameters()).device, precision)
        raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id, batch_size, cast, groups)
        return ((raw - self.offset) * self.scale if normalize else raw), truncated
