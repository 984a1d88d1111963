"""HFEngine: sampling with a Hugging Face causal LM, a KV cache and per-row seeds.

One `generate` call, top to bottom:
  1. render every prompt through the chat template with the generation prompt, and encode it
  2. expand to rows (prompt i, sample j), each with its own random stream seeded by (seed, i, j)
  3. order rows by prompt length (less padding; per-row streams keep the grouping out of the result)
  4. continuous batching: up to batch_size rows decode together, one token per step (Gumbel-max with the row's
     own noise, after temperature and top-p); rows that have stopped (or reached max_new_tokens) leave the batch
     and its KV cache, and the next rows join in their place (their prompts prefilled, once per distinct prompt),
     so the batch stays full until the rows run out
  5. put the rows back in prompt-major order as one `Samples`

The running batch of step 4 (prefill, one decode step, rows leaving) has two implementations behind one interface:
`llama.LlamaBatch`, the decoder's maths on a copy of a Llama model's weights and a KV cache allocated once (1.1-1.5x
faster here; see rollout/llama.py), and `HFBatch` below, transformers' forward with its DynamicCache, for every
other model. Speed on the CPU: with bf16 autocast every forward pass casts every fp32 weight to bf16 again, which
for one decoded token costs about as much as the matmuls; so under bf16 both sample from bf16 weights copied once
per `generate` call (weights change between PPO iterations, not within a call).

Sampling is done here, not by `model.generate`: transformers' samplers draw from one RNG for the whole batch, so a
row's sample would depend on its batch neighbours. Top-p keeps the smallest set of most likely tokens whose
probability reaches p (Holtzman et al. 2019), as transformers' TopPLogitsWarper does. No log-probabilities are
returned: PPO recomputes them with its training forward pass, so its first ratio is exactly 1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhfkit import models
from rlhfkit.fast import attention, layers
from rlhfkit.core.lm import real_columns
from rlhfkit.data import chat
from rlhfkit.data.collate import pad_left
from rlhfkit.data.formats import Messages
from rlhfkit.rollout import Samples, SamplingParams, assemble, check_fits, distinct_prompts, llama, row_rng


def tempered(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) logits / T, with −inf outside the top-p nucleus."""
    logits = logits.float() / temperature if temperature != 1 else logits.float()  # x / 1 is x: skip a pass
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before the token already reaches p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, gumbel: torch.Tensor | None, temperature: float, top_p: float
                  ) -> torch.Tensor:
    """One token per row. logits (B, V), gumbel (B, V) standard Gumbel noise (None when greedy) -> tokens (B,) long.

    Gumbel-max: argmax(logits / T + g) is a draw from softmax(logits / T). Each row's noise comes from its own
    stream, so the draw does not depend on the batch; and a tiny change of the logits (a different padding width
    or batch) changes the draw only if the two best perturbed scores are that close, which is rare, whereas an
    inverse-CDF draw moves whenever the float32 CDF over the vocabulary shifts by a token's width.
    This is the definition; the engine uses `sample_tokens_topk`, which draws from the same distribution.
    """
    if temperature == 0:
        return logits.float().argmax(-1)
    return (tempered(logits, temperature, top_p) + gumbel.to(torch.float32)).argmax(-1)


TOP_K = 64  # candidates that get their own Gumbel noise in `sample_tokens_topk`


def sample_tokens_topk(logits: torch.Tensor, rngs: list[np.random.Generator], temperature: float, top_p: float,
                       k: int = TOP_K) -> torch.Tensor:
    """`sample_tokens`' distribution with k + 1 Gumbel draws per row instead of V (49,152 for SmolLM2).

    The k most likely tokens get their own noise; the other V − k compete as one: the maximum of s_i + g_i over a
    set of tokens is Gumbel with location logsumexp(s) over the set, and which token attains it is independent of
    that maximum, distributed as softmax(s) over the set. So: if the tail's maximum, logsumexp(tail) + g, beats
    the best candidate, the token is drawn from the tail by full Gumbel-max (rare when k covers most of the mass);
    otherwise it is the best candidate. Exact, and per-row deterministic like `sample_tokens`.
    logits (B, V) -> tokens (B,) long.
    """
    if temperature == 0:
        return logits.float().argmax(-1)
    scores = tempered(logits, temperature, top_p)  # (B, V)
    k = min(k, scores.shape[-1])
    top, top_idx = scores.topk(k, dim=-1)  # (B, k)
    lse = scores.logsumexp(-1, keepdim=True)  # (B, 1)
    tail_mass = (1 - (top - lse).exp().sum(-1)).clamp(min=0)  # (B,) probability outside the candidates
    tail_lse = lse.squeeze(-1) + tail_mass.log()  # −inf when the candidates hold all the mass
    noise = gumbel_noise(rngs, k + 1)  # (B, k + 1)
    cand = top + noise[:, :k]
    best = cand.argmax(-1)  # (B,)
    tokens = top_idx.gather(1, best[:, None]).squeeze(1)
    tail_wins = (tail_lse + noise[:, k] > cand.max(-1).values).nonzero().squeeze(1).tolist()
    for b in tail_wins:
        row = scores[b].scatter(0, top_idx[b], float("-inf"))  # the tail only
        tokens[b] = (row + gumbel_noise([rngs[b]], row.shape[-1])[0]).argmax()
    return tokens


def gumbel_noise(rngs: list[np.random.Generator], width: int) -> torch.Tensor:
    """(B, width) standard Gumbel noise, row b from its own stream, drawn on the CPU (the same on every device)."""
    u = torch.from_numpy(np.stack([rng.random(width, dtype=np.float32) for rng in rngs]))
    return -torch.log(-torch.log(u))  # u = 0 gives −inf: never chosen


class HFEngine:
    """Batched sampling with a Hugging Face causal LM (`AutoModelForCausalLM`, or a peft model around one).

    batch_size: rows (sequences) per forward pass. precision: "no", "bf16" or "fp16" autocast, as returned by
    `models.mixed_precision`. stop_ids: tokens that end a response; default `chat.end_of_turn_ids(tokenizer)`
    (EOS, the template's end-of-turn token, `<|endoftext|>` where the vocabulary has them). backend: "auto"
    (`llama.LlamaBatch` where the model is a Llama, else `HFBatch`), "hf" or "llama".
    """

    samples_with_model = True

    def __init__(self, model, tokenizer, batch_size: int = 16, precision: str = "no",
                 stop_ids: Iterable[int] | None = None, progress: bool = False, backend: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if backend not in ("auto", "hf", "llama"):
            raise ValueError(f"backend must be auto, hf or llama, got {backend!r}")
        self.backend = backend
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self.precision = precision
        self.stop_ids = torch.tensor(sorted(chat.end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.progress = progress

    def encode_prompt(self, messages: Messages) -> list[int]:
        return chat.encode_prompt(self.tok, messages)

    def check_fits(self, lengths: list[int], max_new_tokens: int) -> None:
        check_fits(lengths, max_new_tokens, getattr(getattr(self.model, "config", None), "max_position_embeddings",
                                                    None))

    def sync(self, model) -> float:
        """Nothing to load: this engine samples with the model itself."""
        return 0.0

    def sleep(self) -> None:
        """Nothing to free: the model is the trainer's."""

    def generate(self, prompts: list[Messages], params: SamplingParams) -> Samples:
        """n samples per prompt; row i·n + j is sample j of prompt i (see `Samples`)."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        # 1. prompts as the template renders them for generation, each with room for its response
        encoded = [self.encode_prompt(m) for m in prompts]
        self.check_fits([len(e) for e in encoded], params.max_new_tokens)
        # 2. rows (i, j), each with its own random stream
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        # 3. rows join the batch in order of prompt length (less padding), a prompt's n rows together
        order = sorted(range(len(rows)), key=lambda r: len(encoded[rows[r][0]]))
        bar = tqdm(total=len(rows), disable=not self.progress, desc="generate", unit="seq", dynamic_ncols=True)
        was_training = self.model.training
        self.model.eval()
        try:
            # 4. continuous batching: prefill + decode
            streams = [row_rng(params.seed, params.first_prompt + rows[r][0], rows[r][1]) for r in order]
            out, done = self._decode([encoded[rows[r][0]] for r in order], streams, params, bar)
        finally:
            self.model.train(was_training)
            bar.close()
        responses: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        for k, r in enumerate(order):
            responses[r], finished[r] = out[k], done[k]
        # 5. prompt-major tensors and text
        return assemble(self.tok, self.pad_id, encoded, rows, responses, finished, params.n)

    def _running_batch(self, prompts: list[list[int]], params: SamplingParams):
        """The running batch to decode with: `llama.LlamaBatch` on a copy of a Llama model's weights (in the
        autocast dtype under bf16 or fp16, else the model's), else `HFBatch` on the model (a bf16 copy under bf16
        on the CPU: see the module docstring). `backend` "hf" forces the latter."""
        device = next(self.model.parameters()).device
        if self.backend != "hf" and llama.unsupported(self.model) is None:
            dtype = models.AUTOCAST_DTYPES.get(self.precision, next(self.model.parameters()).dtype)
            return llama.LlamaBatch(llama.LlamaWeights(self.model, dtype), prompts, self.batch_size,
                                    params.max_new_tokens)
        if self.backend == "llama":
            raise ValueError(f"backend 'llama' cannot run this model: {llama.unsupported(self.model)}")
        model = self.model
        if self.precision == "bf16" and device.type == "cpu":
            model = copy.deepcopy(self.model).to(torch.bfloat16).eval()
        return HFBatch(model, self.pad_id, self.precision)

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], rngs: list[np.random.Generator], params: SamplingParams,
                bar) -> tuple[list[list[int]], list[bool]]:
        """Sampled tokens of each row (up to and including its stop token) and whether it stopped.

        Continuous batching: up to batch_size rows decode together, one token per step (Gumbel-max with each row's
        own noise). Rows that have stopped leave the batch and its KV cache once they are an eighth of it, and
        the next rows join in their place (their prompts prefilled). So the batch stays full until the rows run
        out, instead of draining to the few longest answers of each batch. A row's tokens depend only on its own
        prompt and random stream.
        """
        batch = self._running_batch(prompts, params)
        stop_ids, k_max = self.stop_ids, params.max_new_tokens
        tokens = torch.full((len(prompts), k_max), self.pad_id, dtype=torch.long)  # (N, K)
        lengths = torch.zeros(len(prompts), dtype=torch.long)  # (N,) tokens sampled so far
        stopped = torch.zeros(len(prompts), dtype=torch.bool)  # (N,)
        active = torch.zeros(0, dtype=torch.long)  # (A,) rows in the batch, in batch order
        done = torch.zeros(0, dtype=torch.bool)  # (A,) row has finished but not left yet
        logits = None  # (A, V) next-token logits of the rows in the batch
        joined = 0  # rows [0, joined) have joined
        while joined < len(prompts) or len(active):
            free = self.batch_size - len(active)
            if joined < len(prompts) and (not len(active) or (
                    batch.can_join() and free >= min(max(1, self.batch_size // 8), len(prompts) - joined))):
                new = torch.arange(joined, min(len(prompts), joined + free))
                joined = int(new[-1]) + 1
                lg = batch.join([prompts[r] for r in new.tolist()]).cpu()
                logits = lg if logits is None or not len(active) else torch.cat([logits, lg])
                active = torch.cat([active, new])
                done = torch.cat([done, torch.zeros(len(new), dtype=torch.bool)])
            token = sample_tokens_topk(logits, [rngs[r] for r in active.tolist()], params.temperature,
                                       params.top_p)  # (A,)
            token = torch.where(done, self.pad_id, token)
            rows = active[~done]
            tokens[rows, lengths[rows]] = token[~done]
            lengths[rows] += 1
            hit = torch.isin(token, stop_ids)
            stopped[active[hit & ~done]] = True
            done = done | hit | (lengths[active] >= k_max)
            if int(done.sum()) * 8 >= len(done):  # an eighth has finished: they leave the batch and the cache
                bar.update(int(done.sum()))
                keep = fill_holes((~done).nonzero().squeeze(1))
                batch.keep(keep)
                active, token, done = active[keep], token[keep], done[keep]
                if not len(active):
                    continue
            logits = batch.step(token).cpu()
        return [tokens[r, :int(lengths[r])].tolist() for r in range(len(prompts))], stopped.tolist()


def fill_holes(rows: torch.Tensor) -> torch.Tensor:
    """The batch order after only `rows` (K,) stay, sorted: out[i] is the row that goes to position i. Rows already
    among the first K positions stay where they are and the others fill the holes, so a cache that moves rows
    (`LlamaBatch`) moves as few as it can. Rows are independent, so their order in the batch changes nothing."""
    out = torch.empty_like(rows)
    stay = rows[rows < len(rows)]
    out[stay] = stay
    holes = torch.ones(len(rows), dtype=torch.bool)
    holes[stay] = False
    out[holes] = rows[rows >= len(rows)]
    return out


class HFBatch:
    """`HFEngine`'s running batch on a transformers causal LM: its DynamicCache, attention mask (A, L) and the
    position (A, 1) of each row's last token. Rows joining are left-padded to the batch's length; rows leaving
    are dropped from the cache, and so are the columns that are then padding in every row. Any model that takes
    a KV cache (`layers.cache_arg`) runs here; where its cache is not a plain DynamicCache (`mergeable`), rows join
    only an empty batch. Same interface as `llama.LlamaBatch`."""

    def __init__(self, model, pad_id: int, precision: str):
        self.model, self.pad_id, self.precision = model, pad_id, precision
        self.device = next(model.parameters()).device
        self.cache = self.mask = self.positions = None

    def __len__(self) -> int:
        return 0 if self.cache is None else len(self.mask)

    def can_join(self) -> bool:
        return self.cache is None or mergeable(self.cache)

    @torch.no_grad()
    def join(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill N prompts into the batch -> (N, V) fp32 logits of each one's next token. Rows of the same prompt
        (n > 1) share one prefill: each distinct prompt runs once and its cache is copied."""
        distinct, row_of = distinct_prompts(prompts, self.device)  # U prompts, (N,)
        ids, mask = pad_left(distinct, self.pad_id)  # (U, P)
        ids, mask = ids.to(self.device), mask.to(self.device)
        # positions count real tokens only, so a row's left padding does not shift its positions
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, P)
        with models.autocast(self.device, self.precision), attention.native_gqa(self.device):  # decode has its own GQA
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
        cache = getattr(out, layers.cache_arg())
        if len(distinct) < len(prompts):
            cache.batch_select_indices(row_of)
        mask, positions = mask[row_of], positions[row_of, -1:]
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
        else:
            self.cache, self.mask = join_caches(self.cache, self.mask, cache, mask)
            self.positions = torch.cat([self.positions, positions])
        return out.logits[:, -1].float()[row_of]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed each row's new token (A,) -> (A, V) fp32 logits of the token after it."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions + 1
        with models.autocast(self.device, self.precision):
            return self.model(input_ids=token[:, None].to(self.device), attention_mask=self.mask,
                              position_ids=self.positions, use_cache=True,
                              **{layers.cache_arg(): self.cache}).logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Only rows `rows` (A',) stay, in that order."""
        if not len(rows):
            self.cache = self.mask = self.positions = None
            return
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.mask, self.positions = self.mask[rows], self.positions[rows]
        if mergeable(self.cache):  # drop the columns that are now padding in every row
            first = real_columns(self.mask).start
            self.cache, self.mask = crop_left(self.cache, first), self.mask[:, first:]


# --- KV caches of rows that joined at different times ----------------------------------------------------------


def mergeable(cache) -> bool:
    """Whether rows can join or be cropped: a transformers DynamicCache of full-attention layers, whose tensors are
    (rows, heads, length, head_dim) with nothing else to keep in step (sliding-window and other caches are not)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def join_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor):
    """`other`'s rows appended to `cache`'s, both left-padded to the longer length; masks (A, L) and (N, L')
    likewise -> (cache, (A + N, max(L, L')) mask). Left padding is masked, so it changes no row's attention."""
    width = max(mask.shape[1], other_mask.shape[1])
    pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t  # noqa: E731  (…, L, d) on the left
    for layer, new in zip(cache.layers, other.layers):
        a, b = width - layer.keys.shape[-2], width - new.keys.shape[-2]
        layer.keys = torch.cat([pad(layer.keys, a), pad(new.keys, b)])
        layer.values = torch.cat([pad(layer.values, a), pad(new.values, b)])
    pad_mask = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
    return cache, torch.cat([pad_mask(mask), pad_mask(other_mask)])


def crop_left(cache, first: int):
    """The cache without its first `first` positions (padding in every row)."""
    if first:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return cache
