"""A reward model at inference: load an `rlhfkit rm` directory, encode (prompt, response) as it was trained, score.

Shared by the RM's trainer (algos/reward.py: encoding, pooling), `rlhfkit score`, best-of-n, PPO and eval.
- The score is read at the last token of the chat template's rendering of prompt + response, where plain
  `AutoModelForSequenceClassification` pools it; the RM's pad token is one the template never writes
  (`set_reward_pad_token`), so padding can never be mistaken for the pooled token.
- `RewardModel.score` applies the recorded normalisation (r − offset) × scale unless told not to. The n samples of
  a prompt share its prefix: it runs once into a KV cache (`score_shared_prefixes`, equal up to float rounding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit import DataError, ModelError, models
from rlhfkit.fast import attention, prefixes
from rlhfkit.data import chat
from rlhfkit.data.collate import pad_left, pad_right
from rlhfkit.data.formats import Messages
from rlhfkit.rollout.hf import autocast


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


def score_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> scores (N,) fp32, pooled by transformers itself at the rightmost non-pad token."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, 0].float()


def score_on_prefixes(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, row_of: torch.Tensor,
                      suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, cache=None) -> torch.Tensor:
    """`score_batch` of the sequences prefix[row_of[i]] + suffix[i], running each prefix once (tested equal).

    `prefixes.decode_on_prefixes` runs the G prefixes ((G, P), left-padded) once and the right-padded suffixes
    ((R, S)) on their KV cache; the score is read at each row's last real token, where transformers pools.
    Under the caller's autocast: the model's own forward (and so an accelerate autocast wrapper on it) is not
    called. `cache`: the prefixes' `prefixes.prefix_cache`, when several batches of suffixes share them.
    Returns (R,) fp32.
    """
    device = next(model.parameters()).device
    row_of, suffix_mask = row_of.to(device), suffix_mask.to(device)
    hidden = prefixes.decode_on_prefixes(model.base_model, prefix_ids.to(device), prefix_mask.to(device), row_of,
                                       suffix_ids.to(device), suffix_mask, cache)  # (R, S, H)
    last = hidden[torch.arange(len(row_of), device=device), suffix_mask.sum(1) - 1]  # (R, H)
    return model.score(last)[:, 0].float()


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int, autocast, progress: bool = False
                    ) -> torch.Tensor:
    """Scores [len(seqs)] in input order; batches are formed from length-sorted sequences to pad little."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(order), batch_size), disable=not progress, desc="score", dynamic_ncols=True):
        idx = order[i:i + batch_size]
        with autocast(), attention.native_gqa(device):
            out[idx] = score_batch(model, *pad_right([seqs[j] for j in idx], pad_id)).double().cpu()
    return out


def can_share_prefix(model) -> bool:
    """A plain transformers sequence-classification model (not DDP- or peft-wrapped): `score_on_prefixes` can
    drive it."""
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
              precision: str, normalize: bool = True) -> tuple[torch.Tensor, int]:
        """(N,) float64 scores, normalised unless told otherwise, and how many sequences were truncated."""
        if self.precision != "no" and precision != self.precision:
            raise ValueError(f"this reward model was loaded for {self.precision} scoring, not {precision}")
        seqs, truncated = [], 0
        for k, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, full = encode(self.tokenizer, prompt + [{"role": "assistant", "content": response}], max_length,
                               f"sample {k}")
            seqs.append(ids)
            truncated += full > len(ids)
        device = next(self.model.parameters()).device
        cast = functools.partial(autocast, device, precision)
        runs = prompt_runs(prompts)
        if len(runs) < len(prompts) and min(map(len, seqs)) > 1 and can_share_prefix(self.model):
            raw = score_shared_prefixes(self.model, seqs, runs, self.tokenizer.pad_token_id, batch_size, cast)
        else:
            raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id, batch_size, cast)
        return ((raw - self.offset) * self.scale if normalize else raw), truncated


def prompt_runs(prompts: list[Messages]) -> list[range]:
    """Runs of consecutive equal prompts (best-of-n and PPO put a prompt's n samples next to each other)."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append(range(start, i))
            start = i
    return runs


# a group of prompts whose prefixes run together spans up to this many batches of rows, so that its suffixes,
# sorted by length, pad little (best-of-16's responses run from 3 to 48 tokens)
GROUP_BATCHES = 4


@torch.no_grad()
def score_shared_prefixes(model, seqs: list[list[int]], runs: list[range], pad_id: int, batch_size: int,
                          autocast) -> torch.Tensor:
    """`score_sequences`' scores (up to float rounding; tested), reading each run's shared prefix once.

    The n samples of a prompt share the prompt's tokens, often most of the sequence: the shared prefix (the
    longest common one, less at least one token so every sequence keeps a suffix) is run once into a KV cache,
    the cache is copied to the run's rows, and only the suffixes run on top of it. Runs are taken in groups of
    up to GROUP_BATCHES × batch_size rows: the group's prefixes run once, then its suffixes in batches of
    batch_size rows of similar length. The score is read at each sequence's last token, as transformers'
    pooling does for right-padded input. seqs: token ids in input order; runs: ranges of `seqs` to share a
    prefix. Returns (len(seqs),) float64.
    """
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs), dtype=torch.float64)
    shared = []  # (run, prefix length)
    for run in runs:
        n = prefixes.shared_prefix_length([seqs[i] for i in run])
        if n == 0:  # nothing shared (equal prompts render to equal tokens, so not expected): one row per run
            shared += [(range(i, i + 1), len(seqs[i]) - 1) for i in run]
        else:
            shared.append((run, n))
    group: list[tuple[range, int]] = []
    for item in shared + [None]:
        if item is not None and (not group or sum(len(r) for r, _ in group) + len(item[0])
                                 <= GROUP_BATCHES * batch_size):
            group.append(item)
            continue
        # one forward for the group's prefixes (left-padded) into a KV cache ...
        prefix_ids, prefix_mask = pad_left([seqs[r[0]][:n] for r, n in group], pad_id)  # (G, P)
        prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        with autocast(), attention.native_gqa(device):
            cache = prefixes.prefix_cache(model.base_model, prefix_ids, prefix_mask)
        # ... then its rows' suffixes (right-padded), shortest first, batch_size rows per forward on the cache
        rows = sorted(((i, g, n) for g, (r, n) in enumerate(group) for i in r), key=lambda x: len(seqs[x[0]]) - x[2])
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            suffix_ids, suffix_mask = pad_right([seqs[i][n:] for i, _, n in chunk], pad_id)  # (R, S)
            row_of = torch.tensor([g for _, g, _ in chunk])  # (R,) prefix of each row
            with autocast(), attention.native_gqa(device):
                scores = score_on_prefixes(model, prefix_ids, prefix_mask, row_of, suffix_ids, suffix_mask, cache)
            out[[i for i, _, _ in chunk]] = scores.double().cpu()
        if item is not None:
            group = [item]
    return out
