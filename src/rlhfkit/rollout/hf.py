"""HFEngine: sampling with a Hugging Face causal LM, a KV cache and per-row seeds.

One `generate` call, top to bottom:
  1. render every prompt through the chat template with the generation prompt, and encode it
  2. expand to rows (prompt i, sample j), each with its own random stream seeded by (seed, i, j)
  3. batch rows of similar prompt length (less padding; per-row streams keep the grouping out of the result)
  4. per batch: left-pad, prefill the KV cache, then decode one token per step (Gumbel-max with the row's own
     noise, after temperature and top-p) until every row has stopped or max_new_tokens is reached
  5. put the rows back in prompt-major order as one `Samples`

Sampling is done here, not by `model.generate`: transformers' samplers draw from one RNG for the whole batch, so a
row's sample would depend on its batch neighbours. Top-p keeps the smallest set of most likely tokens whose
probability reaches p (Holtzman et al. 2019), as transformers' TopPLogitsWarper does. No log-probabilities are
returned: PPO recomputes them with its training forward pass (issue 4), so its first ratio is exactly 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhfkit.data import chat
from rlhfkit.data.formats import Messages
from rlhfkit.rollout import Samples, SamplingParams, row_rng

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """torch.autocast for `models.mixed_precision`'s "bf16" or "fp16" (on the CPU too); nothing for "no"."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def sample_tokens(logits: torch.Tensor, gumbel: torch.Tensor | None, temperature: float, top_p: float
                  ) -> torch.Tensor:
    """One token per row. logits (B, V), gumbel (B, V) standard Gumbel noise (None when greedy) -> tokens (B,) long.

    Gumbel-max: argmax(logits / T + g) is a draw from softmax(logits / T). Each row's noise comes from its own
    stream, so the draw does not depend on the batch; and a tiny change of the logits (a different padding width
    or batch) changes the draw only if the two best perturbed scores are that close, which is rare, whereas an
    inverse-CDF draw moves whenever the float32 CDF over the vocabulary shifts by a token's width.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before the token already reaches p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return (logits + gumbel.to(logits)).argmax(-1)


def gumbel_noise(rngs: list[np.random.Generator], vocab_size: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise, row b from its own stream, drawn on the CPU (the same on every device)."""
    u = torch.from_numpy(np.stack([rng.random(vocab_size, dtype=np.float32) for rng in rngs]))
    return -torch.log(-torch.log(u))  # u = 0 gives −inf: never chosen


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with pad_id to the longest, and the mask (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


class HFEngine:
    """Batched sampling with a Hugging Face causal LM (`AutoModelForCausalLM`, or a peft model around one).

    batch_size: rows (sequences) per forward pass. precision: "no", "bf16" or "fp16" autocast, as returned by
    `models.mixed_precision`. stop_ids: tokens that end a response; default `chat.end_of_turn_ids(tokenizer)`
    (EOS, the template's end-of-turn token, `<|endoftext|>` where the vocabulary has them).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, precision: str = "no",
                 stop_ids: Iterable[int] | None = None, progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self.precision = precision
        self.stop_ids = torch.tensor(sorted(chat.end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.progress = progress

    def encode_prompt(self, messages: Messages) -> list[int]:
        return chat.encode(self.tok, chat.render(self.tok, messages, add_generation_prompt=True))

    def generate(self, prompts: list[Messages], params: SamplingParams) -> Samples:
        """n samples per prompt; row i·n + j is sample j of prompt i (see `Samples`)."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        # 1. prompts as the template renders them for generation
        encoded = [self.encode_prompt(m) for m in prompts]
        # 2. rows (i, j), each with its own random stream
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        # 3. batches of rows with similar prompt lengths
        order = sorted(range(len(rows)), key=lambda r: len(encoded[rows[r][0]]))
        responses: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        bar = tqdm(total=len(rows), disable=not self.progress, desc="generate", unit="seq", dynamic_ncols=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                # 4. one batch: prefill + decode
                rngs = [row_rng(params.seed, *rows[r]) for r in idx]
                out, done = self._generate_batch([encoded[rows[r][0]] for r in idx], rngs, params)
                for r, ids, stopped in zip(idx, out, done):
                    responses[r], finished[r] = ids, stopped
                bar.update(len(idx))
        finally:
            self.model.train(was_training)
            bar.close()
        # 5. prompt-major tensors and text
        return self._assemble(encoded, rows, responses, finished, params.n)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], rngs: list[np.random.Generator], params: SamplingParams
                        ) -> tuple[list[list[int]], list[bool]]:
        """Sampled tokens of each row (up to and including its stop token) and whether it stopped."""
        device = next(self.model.parameters()).device
        ids, mask = pad_left(prompts, self.pad_id)  # (B, P)
        ids, mask = ids.to(device), mask.to(device)
        stop_ids = self.stop_ids.to(device)
        # positions count real tokens only, so a row's left padding does not shift its positions
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
        steps = []
        with autocast(device, self.precision):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            for t in range(params.max_new_tokens):
                logits = out.logits[:, -1].float()  # (B, V)
                noise = gumbel_noise(rngs, logits.shape[-1]) if params.temperature > 0 else None
                token = sample_tokens(logits, noise, params.temperature, params.top_p)
                token = torch.where(done, self.pad_id, token)  # (B,)
                steps.append(token)
                done = done | torch.isin(token, stop_ids)
                if bool(done.all()) or t == params.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                 past_key_values=out.past_key_values, use_cache=True)
        tokens = torch.stack(steps, dim=1).cpu()  # (B, K')
        is_stop = torch.isin(tokens, self.stop_ids)
        responses, stopped = [], []
        for row, stops in zip(tokens.tolist(), is_stop):
            hit = stops.nonzero()
            end = int(hit[0]) + 1 if len(hit) else len(row)
            responses.append(row[:end])
            stopped.append(bool(len(hit)))
        return responses, stopped

    def _assemble(self, encoded: list[list[int]], rows: list[tuple[int, int]], responses: list[list[int]],
                  finished: list[bool], n: int) -> Samples:
        prompt_ids, prompt_mask = pad_left([encoded[i] for i, _ in rows], self.pad_id)
        width = max(len(r) for r in responses)
        response_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(responses):
            response_ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[k, :len(r)] = 1
        texts = [self.tok.decode(r[:-1] if done else r, skip_special_tokens=True)
                 for r, done in zip(responses, finished)]
        return Samples(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                       response_mask=response_mask, finished=torch.tensor(finished), texts=texts,
                       prompt_index=torch.tensor([i for i, _ in rows]),
                       sample_index=torch.tensor([j for _, j in rows]), n=n, pad_id=self.pad_id)
