"""RLHF with PPO: optimise the policy against a reward under a KL penalty to the SFT model (and PPO-ptx).

Papers: Ouyang et al. 2022 (InstructGPT) Eq. 2: objective = E[r(x, y) − β log(π(y|x)/π_SFT(y|x))] + γ E_pretrain
[log π(x)]; Ziegler et al. 2019 (per-token KL reward, adaptive β); Schulman et al. 2017 (clipped surrogate) and
2016 (GAE); Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"). Critic-free estimators via
`--advantage`: GRPO (Shao et al. 2024), RLOO (Ahmadian et al. 2024), REINFORCE++ (Hu 2025). Maths: core/rl.py
and core/losses.py; every detail with its line: docs/algorithms/ppo.md.

`train`, top to bottom (the code's step comments and docs/algorithms/ppo.md use these numbers):
  1. set-up: the roles (actor, reference, critic, reward model and/or function, monitors, rollout engine) and the
     data, built in algos/ppo_setup.py; the optimizer, resume. The loop calls the roles through one interface:
     `InProcess` (this process's, one of several under torchrun) or, with --backend ray, `RayRoles`
     (algos/ppo_ray.py: each role a Ray actor running this file's functions on it)
  then each iteration:
  2. 2.1 this iteration's prompts (the next --rollout-prompts of a seeded permutation per pass over the prompt
     set, running on into the next pass: every iteration has as many); 2.2 load the actor's weights into the
     rollout engine (vLLM; nothing to do for the hf engine, which samples with the actor itself), and generate n
     responses per prompt (vLLM also returns its sampling log-probs)
  3. score: reward model and/or reward function; a response that never ended gets the missing-EOS penalty
  4. forward passes with the training numerics: old log-probs (actor), reference log-probs, values (critic); with
     frozen first blocks (--freeze-layers), those run once, for the actor and reference together and for the
     critic, and the passes and step 6 start from their hidden states (--shared-blocks)
  5. rewards and advantages: per-token −β·KL plus the score on the last token, then GAE / GRPO / RLOO / REINFORCE++
  6. PPO epochs over minibatches: clipped surrogate, weighted by π_trainer/π_engine where the engine's numerics
     differ (--rollout-correction) (+ clipped value loss, + entropy bonus, + GRPO's KL term, + the PPO-ptx
     pre-training loss), clipping, optimizer step; optional early stop on approximate KL. The first
     --critic-warmup iterations train the critic alone
  7. adaptive β, logs (per phase timings, --monitor scores such as a held-out RM or the gold score), sample
     table, checkpoint
  8. after the last iteration: the final policy as a Hugging Face directory

Departures, and why:
- Dropout is off in every model (all run in eval mode; ALGORITHMS.md).
- Data-parallel (`torchrun`/`accelerate launch`): each process samples, scores and runs the log-prob, reference
  and value passes for its share of the iteration's prompts (a prompt's n samples stay on one process); what is a
  statistic of the batch (score scaling, advantages and their whitening, KL, early stopping, the logs) is computed
  on the gathered global batch, and a minibatch is the same set of rows as with one process, so N processes
  update as one does (tested). The actor and critic are replicated (DDP), or sharded (--sharding fsdp2) and
  gathered whole for the rollout (sampling and the log-prob passes run a different number of forwards on each
  process), or replicated with their gradients and AdamW state split (zero2; zero3 is refused: its hooks gather
  in every forward, which such a rollout cannot match); the reference and the reward model are replicated, or
  sharded too with --shard-frozen (FSDP2); a sharded model is gathered whole for its own pass only.
- The value head is read at the position whose logit samples the token (the convention of TRL and OpenRLHF).
- Minibatches are drawn as whole prompt groups (a prompt's n samples stay together, as TRL's GRPO sampler keeps
  them), so that each forward runs a shared prompt once (`--shared-prefix`).
- PPO-ptx's γ multiplies the token-mean pre-training NLL of a ptx batch; InstructGPT's γ = 27.8 was tuned for its
  own loss scaling, so the default here is 1.
- With --engine vllm the old log-probs are still the trainer's own (step 4), not the engine's: the engine's are
  kept only to weight the loss by their ratio (--rollout-correction, as TRL, OpenRLHF and veRL do) and to log the
  mismatch. With several processes each runs its own vLLM engine on its share of the prompts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhfkit import UsageError, checkpoint, distributed, forward, models
from rlhfkit.algos.ppo_setup import Roles, build_roles, check, load_prompts, load_ptx
from rlhfkit.config import write_run_json
from rlhfkit.core import rl
from rlhfkit.core.losses import gae, kl_estimate, kl_penalized_rewards, masked_mean, masked_whiten
from rlhfkit.data import formats
from rlhfkit.fast import prefixes
from rlhfkit.reward_fn import call_reward_fn
from rlhfkit.reward_model import RewardModel
from rlhfkit.rollout import EngineConfig, Samples, SamplingParams
from rlhfkit.tracking import read_metrics, release_output, truncate_jsonl
from rlhfkit.training import (RunConfig, adamw, begin, global_batch_rows, make_schedule, micro_batches,
                              skip_nonfinite, start_run)


@dataclass
class PPOConfig(RunConfig, EngineConfig):
    """rlhfkit ppo: RLHF with PPO against a reward model and/or a reward function, KL-penalised to the SFT model."""

    policy: str = "smollm2-135m"
    """Policy to optimise (and the KL reference), usually the SFT model: alias, HF directory, .gguf or hub id."""
    reward_model: str | None = None
    """Reward-model directory from `rlhfkit rm` (its recorded normalisation is applied)."""
    reward_fn: str | None = None
    """Programmatic reward `module:function` or `file.py:function`, called as fn(prompts, responses, metadata);
    with --reward-model as well, the two are summed."""
    prompts: str = "sample:prompts"
    """Prompts ({"prompt"} or {"messages"} rows, or any format with prompts); other columns go to the reward fn."""
    output: str = "runs/ppo"
    """Output directory: final policy, checkpoints, metrics.jsonl, samples.jsonl, TensorBoard events, run.json."""
    advantage: str = "gae"
    """Advantage estimator: gae (PPO with a critic), grpo, rloo or reinforce++ (critic-free)."""
    iterations: int = 20
    """PPO iterations (rollout + update)."""
    rollout_prompts: int = 8
    """Prompts per iteration."""
    n_samples: int = 1
    """Responses per prompt (≥ 2 for grpo and rloo, which compare a prompt's samples)."""
    temperature: float = 1.0
    """Sampling temperature; every log-prob used in training is computed from logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Longest response in tokens."""
    kl_coef: float = 0.05
    """β of the KL penalty (initial value when --adaptive-kl)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 = log π − log π_ref, or k3."""
    adaptive_kl: bool = False
    """Adapt β towards --kl-target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per sequence for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive controller."""
    missing_eos_penalty: float | None = -1.0
    """Score given to a response that never ended (with --missing-eos replace) or subtracted (subtract)."""
    missing_eos: str = "replace"
    """What to do with the score of a response that hit max_new_tokens: replace, subtract or none."""
    score_clip: float | None = None
    """Clip scores to ±this before they enter the rewards."""
    scale_scores: bool = False
    """Divide the scores by their batch standard deviation (without shifting the mean)."""
    gamma: float = 1.0
    """Discount (GAE)."""
    lam: float = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens (gae, grpo and rloo; reinforce++ always does)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (InstructGPT: 1)."""
    minibatch_size: int = 8
    """Rows per optimizer step."""
    batch_size: int = 8
    """Rows per forward pass (micro-batch) in training and log-prob passes."""
    generate_batch_size: int = 64
    """Rows decoded together when sampling (wider batches use the CPU's matmul units better)."""
    clip_eps: float = 0.2
    """PPO ratio clip ε."""
    value_clip: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    early_stop_kl: float | None = None
    """Stop an iteration's updates when the approximate KL of a minibatch exceeds this."""
    critic_init: str = "auto"
    """Critic initialisation: rm (from the reward model, InstructGPT), zero (policy backbone, zero head) or auto."""
    critic_lr: float = 5e-6
    """Learning rate of the critic."""
    critic_warmup: int = 0
    """The first N iterations train the critic alone (GAE), so that the actor's first updates see values fitted to
    its returns rather than the reward model's scores of partial responses (veRL's critic_warmup, OpenRLHF's
    --freezing_actor_steps); they count in --iterations."""
    lr: float = 1e-6
    """Learning rate of the actor."""
    schedule: str = "constant"
    """Learning-rate schedule over iterations: constant, cosine or linear."""
    warmup_ratio: float = 0.0
    """Fraction of the iterations spent warming up."""
    ptx_data: str | None = None
    """PPO-ptx: pre-training (or SFT) data whose log-likelihood is added to every update."""
    ptx_coef: float = 1.0
    """γ of PPO-ptx: weight of the token-mean pre-training NLL."""
    ptx_batch_size: int = 8
    """Rows of ptx data per optimizer step."""
    max_length: int = 512
    """Longest prompt in tokens after the chat template (longer prompts are skipped and counted); also the ptx
    truncation length."""
    rm_batch_size: int = 16
    """Sequences per reward-model forward."""
    sample_every: int = 5
    """Write a few prompts/responses/scores to samples.jsonl every N iterations."""
    watch_window: int = 3
    """Over-optimisation alarms (`core.rl.watch`: the proxy rising while a --monitor held-out score falls, KL
    growth, entropy collapse, response-length drift), comparing the last N iterations with the N before; logged as
    watch/KIND (1 while raised) and printed when first raised. 0: off."""
    shared_prefix: bool = True
    """Run the prompt of a prompt's n samples once per forward (log-probs, reference, values, training) and the
    responses on its KV cache: the same numbers up to float rounding, on fewer tokens (not while training with
    gradient checkpointing, whose layers keep no cache). Minibatches hold whole prompt groups either way."""
    shared_blocks: bool = True
    """With --freeze-layers N, in one process: run the frozen embeddings and first N blocks once per iteration for
    the actor and the reference (the same weights) and once for the critic, keep their hidden states, and start
    every later forward of the iteration from them (log-probs, reference, values and the update's): the same
    numbers up to float rounding, without rerunning those blocks in each. Llama-layout models; not with --lora,
    gradient checkpointing, --compile or a --sharding other than ddp."""
    monitor: list[str] = field(default_factory=list)
    """Scores logged each iteration but never optimised, as monitor/NAME: rm:DIR (e.g. a reward model trained on
    held-out comparisons) or module:function (e.g. rlhfkit.sim.tasks:gold_reward, the built-in task's gold score)."""
    shard_frozen: bool = False
    """With --sharding fsdp2 on several processes, shard the frozen reference and reward model too (FSDP2), each
    gathered whole only for its own pass of an iteration; else they are whole on every process."""
    rollout_correction: str = "auto"
    """Weight the policy loss by π_trainer/π_engine where the rollout engine's numerics differ from the
    trainer's: token-tis (per-token ratio truncated at the cap), seq-mask (the sequence's ratio, 0 above the cap),
    none, or auto (seq-mask with --engine vllm, none with hf, whose samples are the trainer's own numerics)."""
    rollout_correction_cap: float = 3.0
    """The cap of --rollout-correction (TRL's default for seq-mask: 3)."""
    backend: str = "local"
    """Where the roles run: local (this process; several with torchrun or accelerate launch) or ray (actor, critic,
    reference, reward model and rollout engines as Ray actors in placement groups; algos/ppo_ray.py)."""
    ray_address: str | None = None
    """--backend ray: the cluster to join (ray.init's address, e.g. auto or ray://HOST:10001); else a local one."""
    colocate: str = "all"
    """--backend ray: which roles share devices: all (every role on the same GPUs, as veRL by default), actor-ref,
    critic-reward (those two pairs, the rest on their own, as OpenRLHF's --colocate_actor_ref/critic_reward) or
    none (each role its own)."""
    rollout_engines: int = 1
    """--backend ray: rollout engines (Ray actors), each sampling an equal share of an iteration's prompts."""
    actor_workers: int = 1
    """--backend ray: Ray workers of the actor, one process group (torch.distributed) that trains it data-parallel,
    each on its share of the rows: replicated (--sharding ddp) or sharded (fsdp2); one device each."""
    critic_workers: int = 1
    """--backend ray: Ray workers of the critic, as --actor-workers."""


# --- rollout ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One iteration's experience. B rows (prompts × n), P prompt width (left-padded), R response width.

    input_ids, attention_mask: (B, P + R) prompt and response side by side (`Samples.sequences`)
    prompt_index: (B,) long, the prompt of each row: rows of one prompt run it once (`model_inputs`)
    pad_id: the token the model inputs are padded with
    response_mask: (B, R) float, 1 on sampled tokens (the stop token included)
    logprobs, ref_logprobs: (B, R) log-probs of the sampled tokens under the actor and the reference (at τ)
    engine_logprobs: (B, R) the rollout engine's log-probs of the sampled tokens, or None (hf engine)
    values: (B, R) critic values, or None without a critic
    scores: (B,) the reward after the missing-EOS rule and clipping
    advantages: (B, R); returns: (B, R) critic targets, or None without a critic
    on_policy: the update's own forward gives the old log-probs (see `on_policy`); `logprobs` is then None
    shared_blocks: how many first blocks the forwards skip, starting from the hidden states below (`PPOConfig.
        shared_blocks`); 0: none
    actor_hidden: (B, L, H) the hidden states entering block `shared_blocks` of the actor and the reference at each
        row's tokens (prompt and response without padding, L the longest row), or None
    critic_hidden: (B, L, H) the same for the critic, or None
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_index: torch.Tensor
    pad_id: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    on_policy: bool = False
    engine_logprobs: torch.Tensor | None = None
    shared_blocks: int = 0
    actor_hidden: torch.Tensor | None = None
    critic_hidden: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> Rollout:
        take = lambda t: t[idx] if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Rollout(**{k: take(v) for k, v in vars(self).items()})


def to_tokens(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(M,) per-response-token values back to (B, R), row-major like the selection; 0 off the mask."""
    out = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    out[response_mask.bool()] = flat
    return out


def model_inputs(batch: Rollout, share: bool, hidden: torch.Tensor | None = None) -> forward.Batch:
    """The inputs of the actor's, the reference's or the critic's forward over rows of the rollout: each row its
    prompt and response without padding, the response tokens trained. With `share`, the rows of one prompt (its
    n samples) run the prompt up to its last token once, as a shared prefix (`forward.rows`): the same numbers
    up to float rounding (tested). The selected positions keep the rows' order and, in each row, the response's:
    per-token results go back to (B, R) by `to_tokens`. With `hidden` (the rollout's `actor_hidden` or
    `critic_hidden`), the forward starts from them at block `shared_blocks`."""
    prompt_width = batch.input_ids.shape[1] - batch.response_mask.shape[1]
    ids, real = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()  # (B, P + R)
    trained = torch.cat([torch.zeros_like(ids[:, :prompt_width]), batch.response_mask.cpu().long()], dim=1)
    rows = [forward.Row(i[m].tolist(), t[m].tolist()) for i, m, t in zip(ids, real, trained)]
    inputs = forward.rows(rows, batch.pad_id, batch.prompt_index.tolist() if share else None)
    inputs = inputs.to(batch.input_ids.device)
    if hidden is None:
        return inputs
    return inputs._replace(entry=forward.stored_entry(inputs, hidden, batch.shared_blocks))


def token_logprobs(actor, batch: Rollout, temperature: float, with_entropy: bool = False, share: bool = False,
                   entropy_grad: bool = True):
    """log π(y_t | …) at temperature τ of every response token, (B, R); and the entropies (B, R) if asked, without
    a gradient unless `entropy_grad` (a statistic only: a backward pass through a second (M, V) softmax saved)."""
    inputs = model_inputs(batch, share, batch.actor_hidden)
    logits = forward.logits(actor, inputs).float() / temperature  # (M, V)
    logps = to_tokens(-F.cross_entropy(logits, inputs.targets, reduction="none"), batch.response_mask)
    if not with_entropy:
        return logps, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logps, to_tokens(rl.entropy_from_logits(logits), batch.response_mask)


def token_values(critic, batch: Rollout, share: bool = False) -> torch.Tensor:
    return to_tokens(forward.values(critic, model_inputs(batch, share, batch.critic_hidden)), batch.response_mask)


def hidden_states(model, batch: Rollout, blocks: int, length: int, share: bool) -> torch.Tensor:
    """(B, length, H) the hidden states entering block `blocks` of `model` at each row's tokens (prompt and response
    without padding, left-aligned; 0 beyond the row), from its blocks below: `Rollout.actor_hidden`."""
    inputs = model_inputs(batch, share)
    entry = forward.entry(model, inputs, blocks)
    store = entry.suffix.new_zeros((len(batch.scores), length, entry.suffix.shape[-1]))
    forward.store_entry(inputs, entry, store)
    return store


@torch.no_grad()
def in_chunks(fn, rollout: Rollout, size: int) -> torch.Tensor:
    return torch.cat([fn(rollout.rows(torch.arange(i, min(i + size, len(rollout.scores)))))
                      for i in range(0, len(rollout.scores), size)])


def apply_score_rules(scores: torch.Tensor, finished: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """Missing-EOS rule, then optional scaling and clipping; (B,) -> (B,)."""
    if cfg.missing_eos_penalty is not None and cfg.missing_eos != "none":
        rules = {"replace": torch.full_like(scores, cfg.missing_eos_penalty),
                 "subtract": scores - cfg.missing_eos_penalty}
        scores = torch.where(finished, scores, rules[cfg.missing_eos])
    if cfg.scale_scores and len(scores) > 1:
        scores = scores / scores.std().clamp(min=1e-8)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    return scores


def missing_eos_notice(finished: torch.Tensor, cfg: PPOConfig, iteration: int, warned: bool) -> str | None:
    """What to tell the user when `--missing-eos replace` replaced most of an iteration's scores (once a run:
    `warned`) or all of them (every time: then the reward gives the iteration no learning signal). finished: (B,)."""
    if cfg.missing_eos != "replace" or cfg.missing_eos_penalty is None:
        return None
    n, unfinished = len(finished), int((~finished).sum())
    fix = (f"raise --max-new-tokens (now {cfg.max_new_tokens}) or pass --missing-eos subtract|none")
    if unfinished == n:
        return (f"iteration {iteration}: none of the {n} responses ended within --max-new-tokens, so the missing-EOS "
                f"rule gave every one the score {cfg.missing_eos_penalty:g}: no learning signal from the reward in "
                f"this iteration; {fix}")
    if unfinished > n / 2 and not warned:
        return (f"warning: iteration {iteration}: {unfinished} of {n} responses did not end within --max-new-tokens "
                f"and got the missing-EOS score {cfg.missing_eos_penalty:g} instead of theirs; {fix}")
    return None


def compute_advantages(cfg: PPOConfig, beta: float, scores: torch.Tensor, mask: torch.Tensor,
                       logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor, values: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 5: the estimator chosen by --advantage over the whole batch: (B, R) advantages, and (B, R) returns for
    GAE (else None). scores: (B,); mask, logprobs (None on-policy), ref_logprobs, values (GAE): (B, R)."""
    if cfg.advantage == "gae":
        rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta, cfg.kl_estimator)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    elif cfg.advantage == "grpo":  # KL enters the loss instead (step 6)
        adv, returns = rl.broadcast(rl.grpo_advantages(scores, cfg.n_samples), mask), None
    elif cfg.advantage == "rloo":  # KL folded into the sequence reward
        kl = (kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * mask).sum(1)
        adv, returns = rl.broadcast(rl.rloo_advantages(scores - beta * kl, cfg.n_samples), mask), None
    else:
        return rl.reinforce_pp_advantages(scores, logprobs, ref_logprobs, mask, beta, cfg.kl_estimator), None
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    return adv, returns


# --- data parallel ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's share of an iteration: prompts [first, first + count) of its P prompts, hence rows
    [first·n, (first + count)·n) of its B = P·n rows (prompt-major: a prompt's n samples stay on one process, for
    GRPO and RLOO). With one process, the whole batch. `gather` and `mine` move (B, ...) tensors between the
    process's rows and the global batch, whose statistics every process then computes alike."""

    accelerator: Any
    first: int
    count: int
    n: int

    @classmethod
    def of(cls, accelerator, prompts: int, n: int) -> Shard:
        per = prompts // accelerator.num_processes
        return cls(accelerator, accelerator.process_index * per, per, n)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def owner(self, rows: torch.Tensor) -> torch.Tensor:
        """(K,) global row indices -> (K,) the process that holds each."""
        return rows // (self.count * self.n)

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """(K,) global row indices -> those of this process, as indices into its own rows, in the given order."""
        lo = self.first * self.n
        return rows[(rows >= lo) & (rows < lo + self.count * self.n)] - lo

    def gather(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(b, ...) on each process -> (B, ...) on every process, in global row order; dim 1 right-padded with 0
        to the widest process's."""
        if x is None or self.world == 1:
            return x
        if x.dim() > 1:
            x = self.accelerator.pad_across_processes(x, dim=1)
        return self.accelerator.gather(x)

    def mine(self, x: torch.Tensor | None, width: int | None = None) -> torch.Tensor | None:
        """(B, ...) -> this process's (b, ...) rows, dim 1 cut to `width` (its own rows' width)."""
        if x is None:
            return None
        x = x[self.first * self.n:(self.first + self.count) * self.n]
        return x if width is None else x[:, :width]

    def sum(self, x: float) -> float:
        """A number summed over the processes."""
        return float(self.accelerator.reduce(torch.tensor(x, dtype=torch.float64, device=self.accelerator.device),
                                             "sum")) if self.world > 1 else x


def data_parallel(net: torch.nn.ModuleDict, sharding: str, accelerator, pad_id: int) -> dict[str, torch.nn.Module]:
    """The trained roles as the update calls them, with several processes: with ddp each wrapped in DDP (its
    gradients averaged in the backward pass) while the rollout's passes call the plain modules (they take no
    gradient, and their number differs between processes); with fsdp2 each sharded in place
    (`distributed.shard`), whole only for a rollout pass (`distributed.gathered`); with zero2 as they are, the
    DeepSpeed engine built around both with the optimizer. One process: as they are."""
    if accelerator.num_processes == 1:
        return dict(net.items())
    if sharding == "zero2":  # the engine around them both (`distributed.prepare_optimizer`) reduces
        return dict(net.items())
    if sharding == "fsdp2":
        rows = first_rows(pad_id, accelerator.device)
        for m in net.values():
            distributed.shard_root(m, accelerator, lambda m: m(*rows))
        return dict(net.items())
    from torch.nn.parallel import DistributedDataParallel

    ids = [accelerator.device.index] if accelerator.device.type == "cuda" else None
    return {role: DistributedDataParallel(m, device_ids=ids) for role, m in net.items()}


def first_rows(pad_id: int, device) -> forward.Batch:
    """A one-row batch (2 pad tokens) for a sharded role's first forward, which makes it its FSDP2 root."""
    return forward.rows([forward.Row([pad_id, pad_id], [0, 1])], pad_id).to(device)


def shard_frozen(roles: Roles, accelerator, pad_id: int) -> None:
    """--shard-frozen: the reference and the reward model sharded as the trained roles are (FSDP2), each gathered
    whole only around its own pass (`score`, `experience`)."""
    rows = first_rows(pad_id, accelerator.device)
    if roles.ref is not None:
        distributed.shard_root(roles.ref, accelerator, lambda m: m(*rows))
    if roles.reward_model is not None:
        distributed.shard_root(roles.reward_model.model, accelerator,
                               lambda m: m(input_ids=rows.input_ids, attention_mask=rows.attention_mask))


# --- the PPO update -----------------------------------------------------------------------------------------


class UpdateStats(NamedTuple):
    """An update's statistics, summed over its response tokens (`ratio_dev_max`: the maximum); None where the run
    has no such term (no critic, no ptx data), or where these rows' roles do not compute it (a Ray worker holds
    the actor or the critic: `merge` joins theirs). Logged divided by the tokens seen."""

    policy_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    clipfrac: torch.Tensor | None = None
    approx_kl: torch.Tensor | None = None
    ratio: torch.Tensor | None = None
    ratio_dev_max: torch.Tensor | None = None
    value_loss: torch.Tensor | None = None
    value_clipfrac: torch.Tensor | None = None
    ptx_loss: torch.Tensor | None = None

    def merge(self, other: UpdateStats) -> UpdateStats:
        both = lambda k, a, b: a if b is None else b if a is None else (  # noqa: E731
            torch.maximum(a, b) if k.endswith("_max") else a + b)
        return UpdateStats(*(both(k, a, b) for k, a, b in zip(self._fields, self, other)))

    def across(self, accelerator) -> UpdateStats:
        """The statistics over every process: sums summed, `ratio_dev_max` the maximum."""
        if accelerator.num_processes == 1:
            return self
        import torch.distributed as dist

        present = [k for k, v in self._asdict().items() if v is not None]
        stacked = torch.stack([getattr(self, k).float() for k in present])
        sums, top = stacked.clone(), stacked.clone()
        dist.all_reduce(sums)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return self._replace(**{k: top[i] if k.endswith("_max") else sums[i] for i, k in enumerate(present)})


def minibatch_loss(net, mb: Rollout, cfg: PPOConfig, beta: float, n_tokens: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None, UpdateStats]:
    """Step 6 for one micro-batch of the roles in `net` ("actor" and/or "critic"): the loss scaled by the
    minibatch's token count, the actor's log-probs of the sampled tokens (B, R) without their graph (None without
    the actor), and the summed statistics. The actor's and the critic's terms share no parameters, so their sum's
    gradients are each term's own: a Ray worker holding one role computes its term alone."""
    mask = mb.response_mask
    # checkpointed layers keep no KV cache; compiled ones run eagerly on one (`fast.layers.compile_layers`); a
    # sharded actor runs whole rows (`distributed.whole_rows`)
    share = cfg.shared_prefix and not (cfg.gradient_checkpointing or cfg.compile
                                       or any(distributed.whole_rows(m, cfg.sharding) for m in net.values()))
    loss, logps, stats = torch.zeros(()), None, UpdateStats()
    if "actor" in net:
        logps, entropy = token_logprobs(net["actor"], mb, cfg.temperature, with_entropy=True, share=share,
                                        entropy_grad=cfg.entropy_coef != 0)
        old = logps.detach() if mb.on_policy else mb.logprobs
        pg, ratio = rl.clipped_policy_loss(logps, old, mb.advantages, cfg.clip_eps)
        if mb.engine_logprobs is not None:  # the tokens came from another engine's numerics (TRL: after the clip)
            pg = pg * rl.rollout_correction(old, mb.engine_logprobs, mask, correction(cfg),
                                            cfg.rollout_correction_cap)
        loss = (pg * mask).sum() / n_tokens - cfg.entropy_coef * (entropy * mask).sum() / n_tokens
        outside = ((ratio - 1).abs() > cfg.clip_eps).float()
        stats = UpdateStats((pg * mask).sum(), (entropy * mask).sum(), (outside * mask).sum(),
                            (rl.approx_kl(logps, old) * mask).sum(), (ratio * mask).sum(),
                            ((ratio - 1).abs() * mask).max())
        if cfg.advantage == "grpo":
            kl = kl_estimate(logps, mb.ref_logprobs, "k3")
            loss = loss + beta * (kl * mask).sum() / n_tokens
        logps = logps.detach()
    if "critic" in net:
        values = token_values(net["critic"], mb, share)
        vl, clipped = rl.clipped_value_loss(values, mb.values, mb.returns, cfg.value_clip)
        loss = loss + cfg.vf_coef * (vl * mask).sum() / n_tokens
        stats = stats._replace(value_loss=(vl * mask).sum(), value_clipfrac=(clipped.float() * mask).sum())
    return loss, logps, UpdateStats(*(None if v is None else v.detach() for v in stats))


def correction(cfg: PPOConfig) -> str:
    """--rollout-correction with auto resolved: seq-mask for an engine that reports its log-probs (vLLM)."""
    return "seq-mask" if cfg.rollout_correction == "auto" else cfg.rollout_correction


def engine_mismatch(cfg: PPOConfig, trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor
                    ) -> dict[str, float]:
    """The iteration's rollout/engine_* metrics: how far the engine's sampling log-probs are from the trainer's
    old log-probs over the batch's response tokens (B, R each): the token ratio π_trainer/π_engine (mean, max),
    KL(π_engine ‖ π_trainer) per token (k3), the largest |Δ log π|, and the share of tokens --rollout-correction
    weights 0 (seq-mask) or truncates (token-tis)."""
    on, mode = mask > 0, correction(cfg)
    ratio = (trainer - engine).exp()[on]
    weights = rl.rollout_correction(trainer, engine, mask, mode, cfg.rollout_correction_cap)[on]
    cut = {"seq-mask": weights == 0, "token-tis": weights < ratio}.get(mode, torch.zeros_like(on[on]))
    return {"rollout/engine_ratio_mean": float(ratio.mean()), "rollout/engine_ratio_max": float(ratio.max()),
            "rollout/engine_kl": float(rl.engine_mismatch_kl(trainer, engine)[on].mean()),
            "rollout/engine_logp_diff_max": float((trainer - engine).abs()[on].max()),
            "rollout/engine_corrected_fraction": float(cut.float().mean())}


def iteration_prompts(it: int, n_prompts: int, per_iteration: int, seed: int) -> list[int]:
    """Step 2.1: the prompt indices of iteration `it`, the next `per_iteration` of a stream of seeded permutations
    of the prompt set, one per pass (pass e seeded by seed + e). A pass's last batch runs on into the next pass,
    so every iteration has the same number of prompts (which data-parallel processes split evenly); the position
    is just the iteration number, so resuming needs no sampler state."""
    out: list[int] = []
    while len(out) < per_iteration:
        epoch, offset = divmod(it * per_iteration + len(out), n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += perm[offset:offset + per_iteration - len(out)]
    return out


def on_policy(cfg: PPOConfig, rows: int) -> bool:
    """GRPO with one epoch of one minibatch updates the policy that sampled: its own forward gives the old
    log-probs (the ratio is 1 and its gradient the policy gradient), so the separate old-log-prob pass is skipped,
    as TRL does. RLOO, REINFORCE++ and GAE need them before the update, for the KL in the reward."""
    return cfg.advantage == "grpo" and cfg.ppo_epochs == 1 and cfg.minibatch_size >= rows


def ptx_loss(net, rows, pad_id: int, device, n_tokens: int | None = None) -> torch.Tensor:
    """Summed NLL of pre-training/SFT rows over `n_tokens` (PPO-ptx): by default their own trained tokens, the
    token mean; a process's share of a ptx batch divides by the whole batch's."""
    logps = forward.token_logps(net["actor"], forward.rows(rows, pad_id).to(device))  # (M,)
    return -logps.sum() / max(len(logps) if n_tokens is None else n_tokens, 1)


# --- the roles' work, where they are held ---------------------------------------------------------------------
# The same functions run in this process (`InProcess`, one per torchrun/accelerate process) and in the Ray workers
# (algos/ppo_ray.py), which each hold one role.


def reward_scores(cfg: PPOConfig, reward_model: RewardModel | None, reward_fn, row_prompts: list[formats.Messages],
                  texts: list[str], row_meta: list[dict], groups: list[int], precision: str) -> torch.Tensor:
    """Step 3's raw scores of these samples, (b,) float64: the reward model's and the function's, summed."""
    scores = torch.zeros(len(texts), dtype=torch.float64)
    if reward_model is not None:
        with distributed.gathered(reward_model.model):  # whole for its pass, if --shard-frozen sharded it
            scores += reward_model.score(row_prompts, texts, cfg.rm_batch_size, cfg.max_length + cfg.max_new_tokens,
                                         precision, groups=groups)[0]
    if reward_fn is not None:
        scores += call_reward_fn(reward_fn, cfg.reward_fn, row_prompts, texts, row_meta)
    return scores


def hidden_pass(cfg: PPOConfig, model, rollout: Rollout, blocks: int) -> torch.Tensor:
    """Step 4's hidden states (B, L, H) of every row entering block `blocks` of `model` (`hidden_states`)."""
    length = int(rollout.attention_mask.sum(1).max())
    return in_chunks(lambda b: hidden_states(model, b, blocks, length, cfg.shared_prefix), rollout, cfg.batch_size)


def shared_block_count(cfg: PPOConfig, roles, world: int) -> int:
    """How many first blocks the iteration's forwards run once (`PPOConfig.shared_blocks`): --freeze-layers, where
    the actor's embeddings and those blocks are frozen and the reference's are the same weights (as the forward
    casts them), and the critic's frozen; 0 where that does not hold or sharing is off."""
    n = cfg.freeze_layers
    one_process = world == 1 and cfg.sharding == "ddp"  # no sharded or DeepSpeed-wrapped roles
    if not (cfg.shared_blocks and n > 0 and one_process and roles.ref is not None
            and not (cfg.lora or cfg.gradient_checkpointing or cfg.compile)):
        return 0
    nets = [roles.net["actor"], roles.ref, *([roles.net["critic"]] if "critic" in roles.net else [])]
    lower = lambda net: [net.decoder.embed_tokens.weight,  # noqa: E731
                         *(p for block in net.decoder.layers[:n] for p in block.parameters())]
    if not all(prefixes.can_run_blocks(net.decoder) for net in nets):
        return 0
    if any(p.requires_grad for net in nets for p in lower(net)):
        return 0
    same = all(torch.equal(a.to(b.dtype), b) for a, b in zip(lower(roles.net["actor"]), lower(roles.ref)))
    return n if same else 0


def logprob_pass(cfg: PPOConfig, model, rollout: Rollout) -> torch.Tensor:
    """Step 4's log-probs (B, R) of the sampled tokens under `model` (the actor, or the reference), no gradient;
    a sharded model whole for its pass only, so that one whole model at a time is held besides the shards. No
    gradients here, so checkpointed layers keep their cache: prompts are shared by default."""
    with distributed.gathered(model):
        return in_chunks(lambda b: token_logprobs(model, b, cfg.temperature, share=cfg.shared_prefix)[0], rollout,
                         cfg.batch_size)


def value_pass(cfg: PPOConfig, critic, rollout: Rollout) -> torch.Tensor:
    """Step 4's values (B, R) of the critic."""
    with distributed.gathered(critic):
        return in_chunks(lambda b: token_values(critic, b, cfg.shared_prefix), rollout, cfg.batch_size)


class Minibatch(NamedTuple):
    """What one minibatch's backward passes left (step 6), before the optimizer step."""

    stats: UpdateStats  # summed over this process's rows (`UpdateStats.across` sums the processes')
    train_tokens: float  # prompt and response tokens this process ran forward and backward
    rows: torch.Tensor  # (k,) this process's rows of the minibatch, indices into its share of the batch
    logprobs: torch.Tensor | None  # (k, R) the actor's log-probs of those rows before the step (None: no actor)


@dataclass
class Learner:
    """The trained roles of this process, with their optimizer and schedule: "actor" and, for GAE, "critic" in one
    process, or one of them in a Ray worker. `net` holds them as built (`forward.SelectedLogits`,
    `forward.ValueModel`); `trained` as `data_parallel` wraps them for the update; `engine` is the DeepSpeed engine
    around both under ZeRO, which takes the backward passes and the step, else `net`."""

    cfg: PPOConfig
    net: torch.nn.ModuleDict
    trained: dict[str, torch.nn.Module]
    engine: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.Tensor]
    accelerator: Any
    ptx_rows: list
    pad_id: int

    @classmethod
    def build(cls, cfg: PPOConfig, net: torch.nn.ModuleDict, accelerator, pad_id: int, ptx_rows: list) -> Learner:
        """Spread the roles over the processes (`data_parallel`), then AdamW (the actor's and the critic's learning
        rates as parameter groups) and the schedule on their parameters."""
        trained = data_parallel(net, cfg.sharding, accelerator, pad_id)
        lrs = {"actor": cfg.lr, "critic": cfg.critic_lr}
        groups = [{"params": [p for p in net[r].parameters() if p.requires_grad], "lr": lrs[r]} for r in net]
        params = [p for g in groups for p in g["params"]]
        optimizer = adamw(groups, cfg)
        scheduler = make_schedule(optimizer, cfg, cfg.iterations)
        engine, optimizer = distributed.prepare_optimizer(net, optimizer, cfg, accelerator)  # ZeRO's, else net
        return cls(cfg, net, trained, engine, optimizer, scheduler, params, accelerator, ptx_rows, pad_id)

    def minibatch(self, rollout: Rollout, mb_rows: torch.Tensor, n_tokens: float, beta: float, ptx_step: int,
                  shard: Shard, actor: bool = True) -> Minibatch:
        """The backward passes of one minibatch (`mb_rows`, global rows): this process's rows of it in micro-batches,
        then, with PPO-ptx and an actor, a batch of pre-training rows (batch `ptx_step`). The loss is normalised by
        the minibatch's `n_tokens` over all processes, and every process runs as many micro-batches as the busiest
        (an idle one runs a weight-0 row), so the DDP all-reduce of the last one sums the minibatch's gradient.
        `actor` False (--critic-warmup): the critic's passes alone; the actor gets no gradient."""
        cfg, accelerator, world = self.cfg, self.accelerator, shard.world
        net = {r: m for r, m in self.trained.items() if actor or r != "actor"}
        ptx = bool(self.ptx_rows) and "actor" in net
        mine = shard.local(mb_rows)
        n_micro = max(1, max(math.ceil(int((shard.owner(mb_rows) == p).sum()) / cfg.batch_size)
                             for p in range(world)))
        stats, train_tokens, logprobs = UpdateStats(), 0.0, []
        for u in range(n_micro):
            idx = mine[u * cfg.batch_size:(u + 1) * cfg.batch_size]
            real = len(idx) > 0
            idx = idx if real else torch.zeros(1, dtype=torch.long)  # a stand-in row, weight 0
            train_tokens += float(rollout.attention_mask[idx].sum()) * real  # prompt + response, fwd + bwd
            # each role's gradients are reduced in its last backward of the step; the actor's is PPO-ptx's, if any
            synced = ({"critic"} | (set() if ptx else {"actor"})) if u == n_micro - 1 else set()
            with distributed.gradient_sync([net[r] for r in net if r in synced], True), \
                    distributed.gradient_sync([net[r] for r in net if r not in synced], False):
                with accelerator.autocast():
                    loss, logps, st = minibatch_loss(net, rollout.rows(idx), cfg, beta, n_tokens)
                # DDP averages the processes' gradients: × world makes that their sum
                distributed.backward(loss * (world if real else 0.0), self.engine, accelerator)
            if real and logps is not None:
                logprobs.append(logps.float())
            stats = stats.merge(st if real else UpdateStats(*(None if v is None else v * 0 for v in st)))
        if ptx:
            rows = [self.ptx_rows[i] for i in global_batch_rows(ptx_step, len(self.ptx_rows), cfg.ptx_batch_size,
                                                                cfg.seed)]
            ptx_tokens = len(forward.rows(rows, self.pad_id).targets)
            (mine_ptx, real), = micro_batches(rows, accelerator, len(rows))  # one: this process's share
            with accelerator.autocast():  # the last backward of the step: DDP all-reduces
                loss = ptx_loss(net, mine_ptx, self.pad_id, accelerator.device, ptx_tokens) * real
            distributed.backward(cfg.ptx_coef * loss * world, self.engine, accelerator)
            stats = stats._replace(ptx_loss=loss.detach() * n_tokens)
        return Minibatch(stats, train_tokens, mine, torch.cat(logprobs) if logprobs else None)

    def step(self, clip: float, skip) -> float | None:
        """Clip the gradients to `clip`, step unless `skip(norm)`, clear them; the norm, or None when skipped."""
        return distributed.step(self.engine, self.params, self.optimizer, clip, self.accelerator, skip)

    def grad_norms(self) -> torch.Tensor:
        """(k,) the norm of each parameter's whole gradient, in `params` order: a Ray worker's share of the global
        norm `step` clips by (torch's, the norm of these norms). Sharded (FSDP2), each process holds a part of each
        gradient: the parts' squared norms are summed over the processes (every one must call this)."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(0)
        if not isinstance(grads[0], DTensor):
            return torch.stack(torch._foreach_norm(grads)).cpu()
        squares = torch.stack(torch._foreach_norm([g.to_local() for g in grads])).double() ** 2
        torch.distributed.all_reduce(squares)
        return squares.sqrt().float().cpu()

    def step_with_norm(self, clip: float, total_norm: float | None) -> None:
        """`step` where the norm is of more roles than these (Ray: the actor's and the critic's, as one process
        clips them together); None: the step is skipped, the gradients cleared. The gradients are scaled as
        `torch.nn.utils.clip_grads_with_norm_` scales them, by a float32 factor (a number, which sharded gradients
        take too)."""
        if total_norm is not None:
            factor = (torch.tensor(clip) / (torch.tensor(total_norm) + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, float(factor))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr_step(self) -> float:
        """The learning rate this iteration used; the schedule moves on."""
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr


@dataclass
class InProcess:
    """PPO's roles held in this process (one of several under torchrun/accelerate, each with its share of the
    prompts): what the loop in `train` calls. algos/ppo_ray.py's `RayRoles` is the same interface over Ray
    actors."""

    cfg: PPOConfig
    roles: Roles
    learner: Learner
    shard: Shard
    precision: str
    shared_blocks: int = 0  # `shared_block_count`

    @property
    def monitors(self) -> dict:
        return self.roles.monitors

    @property
    def critic_init(self) -> str | None:
        return self.roles.critic_init

    def sync(self) -> float:
        return self.roles.engine.sync(self.roles.actor)  # vLLM: the weights of the last update

    def generate(self, prompts: list[formats.Messages], params: SamplingParams) -> Samples:
        engine = self.roles.engine
        whole = [self.roles.net["actor"]] if engine.samples_with_model else []  # a sharded actor samples whole (hf)
        with distributed.gathered(*whole):
            samples = engine.generate(prompts, params)
        engine.sleep()  # vLLM on CUDA frees its memory for the trainer until the next sync
        return samples

    def reward(self, row_prompts, texts, row_meta, groups) -> torch.Tensor:
        return reward_scores(self.cfg, self.roles.reward_model, self.roles.reward_fn, row_prompts, texts, row_meta,
                             groups, self.precision)

    def passes(self, rollout: Rollout, timing: dict[str, float]) -> Rollout:
        """Step 4: the rollout with the old log-probs (None on-policy), the reference's log-probs and the values
        (None without a critic), each (b, R); and with shared blocks, their hidden states, which these passes and
        the update's start from."""
        net, accelerator, blocks = self.roles.net, self.learner.accelerator, self.shared_blocks
        t0 = time.perf_counter()
        with accelerator.autocast():
            if blocks:
                rollout = replace(rollout, shared_blocks=blocks,
                                  actor_hidden=hidden_pass(self.cfg, self.roles.ref, rollout, blocks),
                                  critic_hidden=hidden_pass(self.cfg, net["critic"], rollout, blocks)
                                  if "critic" in net else None)
            t1 = time.perf_counter()
            logprobs = None if rollout.on_policy else logprob_pass(self.cfg, net["actor"], rollout)
            t2 = time.perf_counter()
            if self.roles.ref is not None:
                ref_logprobs = logprob_pass(self.cfg, self.roles.ref, rollout)
            else:
                with self.roles.actor.disable_adapter():
                    ref_logprobs = logprob_pass(self.cfg, net["actor"], rollout)
            t3 = time.perf_counter()
            values = value_pass(self.cfg, net["critic"], rollout) if "critic" in net else None
        timing.update({**({"time/shared_blocks": t1 - t0} if blocks else {}), "time/logprobs": t2 - t1,
                       "time/reference": t3 - t2, "time/values": time.perf_counter() - t3})
        return replace(rollout, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values)

    def minibatch(self, rollout, mb_rows, n_tokens, beta, ptx_step, actor: bool = True) -> Minibatch:
        return self.learner.minibatch(rollout, mb_rows, n_tokens, beta, ptx_step, self.shard, actor)

    def step(self, clip: float, skip) -> float | None:
        return self.learner.step(clip, skip)

    def lr_step(self) -> float:
        return self.learner.lr_step()

    @property
    def checkpointed(self) -> tuple:
        """What `training.start_run` restores on --resume: (model, optimizer, schedule)."""
        return self.learner.engine, self.learner.optimizer, self.learner.scheduler

    def restore(self, path: Path) -> None:
        """Nothing left to load: `training.start_run` restored `checkpointed`."""

    def save(self, root: Path, step: int, state: dict) -> None:
        learner = self.learner
        checkpoint.save(root, step, learner.engine, learner.optimizer, learner.scheduler, state, learner.accelerator,
                        self.cfg.save_total_limit, self.cfg)

    def finish(self, out: Path, tok, final: dict) -> None:
        """Step 8: the final policy as a Hugging Face directory, and run.json."""
        cfg, roles, learner = self.cfg, self.roles, self.learner
        weights = distributed.full_state_dict(roles.net["actor"], strip="lm.")  # every process (None: unsharded)
        if learner.accelerator.is_main_process:
            models.save_pretrained(roles.actor, tok, out, merge=cfg.lora and cfg.merge, state_dict=weights)
            held = [*(roles.ref.parameters() if roles.ref else []),
                    *(roles.reward_model.model.parameters() if roles.reward_model else [])]
            write_run_json(out, cfg, "ppo", final, {
                **distributed.report(learner.engine, learner.params, learner.optimizer, learner.accelerator),
                "backend": "in-process", "frozen_bytes_per_process": distributed.bytes_held(held)})


class Scores(NamedTuple):
    raw: torch.Tensor  # (B,) float32, the whole batch: the reward model's and the function's scores summed, as logged
    finished: torch.Tensor  # (B,) bool, the whole batch: the response ended before --max-new-tokens
    shaped: torch.Tensor  # (b,) this process's rows after the missing-EOS rule and clipping, on the device: what
    # PPO optimises
    monitored: dict[str, float]  # "monitor/NAME": the mean of each --monitor over the whole batch


def score(cfg: PPOConfig, team, row_prompts: list[formats.Messages], row_meta: list[dict], samples: Samples,
          shard: Shard) -> Scores:
    """Step 3 on this process's samples (row_prompts and row_meta: each sample's prompt and prompt row); the rules
    that scale by the batch see the whole batch."""
    groups = samples.prompt_index.tolist()  # a prompt's samples share its tokens (`RewardModel.score`)
    scores = team.reward(row_prompts, samples.texts, row_meta, groups)
    device = shard.accelerator.device
    raw = shard.gather(scores.float().to(device)).cpu()
    finished = shard.gather(samples.finished.to(device, torch.long)).cpu().bool()
    monitored = {}
    for name, fn in team.monitors.items():
        values = torch.as_tensor(fn(row_prompts, samples.texts, row_meta, groups), dtype=torch.float64)
        monitored[f"monitor/{name}"] = float(shard.gather(values.to(device)).mean())
    return Scores(raw, finished, shard.mine(apply_score_rules(raw, finished, cfg)).to(device), monitored)


def experience(cfg: PPOConfig, team, samples: Samples, scores: torch.Tensor, beta: float, device,
               timing: dict[str, float], shard: Shard) -> Rollout:
    """Steps 4–5: the old log-probs (unless on-policy), the reference's log-probs and the values of this process's
    samples, computed with the training forward's numerics (`team.passes`), then rewards and advantages over the
    whole batch (gathered: whitening and the estimators see every row). Adds the phases' times to `timing`."""
    input_ids, attention_mask = samples.sequences()
    rollout = Rollout(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      prompt_index=samples.prompt_index.to(device), pad_id=samples.pad_id,
                      response_mask=samples.response_mask.float().to(device),
                      logprobs=None, ref_logprobs=None, values=None, scores=scores,
                      on_policy=on_policy(cfg, len(scores) * shard.world),
                      engine_logprobs=None if samples.logprobs is None else samples.logprobs.to(device))
    rollout = team.passes(rollout, timing)
    width = rollout.response_mask.shape[1]
    g = shard.gather
    advantages, returns = compute_advantages(cfg, beta, g(scores), g(rollout.response_mask), g(rollout.logprobs),
                                             g(rollout.ref_logprobs), g(rollout.values))
    return replace(rollout, advantages=shard.mine(advantages, width), returns=shard.mine(returns, width))


class Updated(NamedTuple):
    """What step 6 did (over every process)."""

    sums: UpdateStats | None  # summed over the updates applied (None: every one was skipped)
    tokens_seen: float  # response tokens of the updates applied
    train_tokens: float  # prompt and response tokens run forward and backward
    updates: int
    stopped_early: bool  # --early-stop-kl ended the epochs
    policy_logprobs: torch.Tensor  # (b, R) the sampling policy's log-probs (on-policy: the update's own forward)


def update_policy(cfg: PPOConfig, team, rollout: Rollout, beta: float, it: int, state: dict, shard: Shard,
                  ckpt_root: Path) -> Updated:
    """Step 6: PPO epochs over minibatches of whole prompt groups, each minibatch one optimizer step over its
    micro-batches (and, with PPO-ptx, a batch of pre-training rows: `Learner.minibatch`). A minibatch is drawn from
    the whole batch, as one process would, and each process runs its own rows of it."""
    accelerator = shard.accelerator
    mask_all = shard.gather(rollout.response_mask)  # (B, R'): the token counts of minibatches
    n_rows = len(mask_all)
    policy_logprobs = torch.zeros_like(rollout.response_mask) if rollout.on_policy else rollout.logprobs  # (b, R)
    sums: UpdateStats | None = None
    tokens_seen, train_tokens, updates, stopped_early = 0.0, 0.0, 0, False
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    actor = it >= cfg.critic_warmup  # else the critic's warm-up: it alone trains
    for _ in range(cfg.ppo_epochs):
        # whole prompt groups per minibatch (TRL's GRPO sampler does the same), so a prompt runs once in it
        groups = torch.randperm(n_rows // cfg.n_samples, generator=gen)
        perm = (groups[:, None] * cfg.n_samples + torch.arange(cfg.n_samples)).flatten()
        for m in range(0, len(perm), cfg.minibatch_size):
            mb_rows = perm[m:m + cfg.minibatch_size]  # global rows
            n_tokens = float(mask_all[mb_rows].sum().clamp(min=1))
            mb = team.minibatch(rollout, mb_rows, n_tokens, beta, state["ptx_step"], actor)
            train_tokens += mb.train_tokens
            if mb.stats.ptx_loss is not None:  # a PPO-ptx batch was used
                state["ptx_step"] += 1
            if rollout.on_policy and mb.logprobs is not None:  # the update's own forward is the sampling policy's
                policy_logprobs[mb.rows] = mb.logprobs
            mb_stats = mb.stats.across(accelerator)
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            trained_loss = mb_stats.policy_loss if actor else mb_stats.value_loss  # the critic's warm-up: no policy
            loss_value = float(trained_loss / n_tokens)
            skip = lambda norm: skip_nonfinite(loss_value, norm, state, cfg, ckpt_root,  # noqa: E731
                                               f"iteration {it + 1}", accelerator.is_main_process)
            if team.step(clip, skip) is None:
                continue
            updates += 1
            tokens_seen += n_tokens
            sums = mb_stats if sums is None else sums.merge(mb_stats)
            if cfg.early_stop_kl is not None and float(mb_stats.approx_kl / n_tokens) > cfg.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    return Updated(sums, tokens_seen, shard.sum(train_tokens), updates, stopped_early, policy_logprobs)


def train(cfg: PPOConfig) -> dict:
    check(cfg)
    # 1. set-up: processes and this one's share of each iteration, precision, the roles (actor, reference, critic,
    # reward; in this process, or as Ray actors with --backend ray)
    accelerator, out = begin(cfg)
    main, world = accelerator.is_main_process, accelerator.num_processes
    if cfg.rollout_prompts % world:
        raise UsageError(f"--rollout-prompts {cfg.rollout_prompts} must be a multiple of the {world} processes "
                         "(each samples an equal share of the prompts)")
    shard = Shard.of(accelerator, cfg.rollout_prompts, cfg.n_samples)
    device, precision = accelerator.device, models.mixed_precision(cfg.dtype)
    tok = models.load_tokenizer(cfg.policy)
    prompt_set = load_prompts(cfg, tok)
    prompts, metadata = prompt_set.messages, prompt_set.metadata
    if cfg.backend == "ray":
        from rlhfkit.algos.ppo_ray import RayRoles

        team = RayRoles.start(cfg, prompt_set, accelerator)
    else:
        frozen_sharded = cfg.shard_frozen and world > 1
        roles = build_roles(cfg, tok, prompt_set, device, precision, frozen_sharded)
        learner = Learner.build(cfg, roles.net, accelerator, tok.pad_token_id, load_ptx(cfg, tok))
        if frozen_sharded:
            shard_frozen(roles, accelerator, tok.pad_token_id)
        team = InProcess(cfg, roles, learner, shard, precision, shared_block_count(cfg, roles, world))

    # resume: weights, optimizer, schedule, β and the ptx position live in the checkpoint
    ckpt_root = out / "checkpoints"
    start = start_run(out, cfg, "ppo", {"step": 0, "beta": cfg.kl_coef, "ptx_step": 0, "nonfinite_skipped": 0,
                                        "episodes": 0}, *team.checkpointed, accelerator, cfg.iterations)
    if start.finished is not None:
        return start.finished
    if start.resumed_from is not None:
        team.restore(start.resumed_from)
    state, tracker = start.state, start.tracker
    samples_path = out / "samples.jsonl"
    if main and start.resumed_from is None:
        samples_path.unlink(missing_ok=True)
    elif main:
        truncate_jsonl(samples_path, "iteration", state["step"])
    bar = tqdm(total=cfg.iterations, initial=state["step"], desc="ppo", dynamic_ncols=True, disable=not main)
    metrics: dict[str, float] = {}
    eos_warned, raised = False, set()
    # the logs so far, for the over-optimisation alarms (a resumed run reads back what it logged)
    history = [r for r in read_metrics(out) if r.get("step", 0) <= state["step"]] if start.resumed_from else []

    while state["step"] < cfg.iterations:
        it, beta, timing, t_iteration = state["step"], state["beta"], {}, time.perf_counter()
        # 2.1 this iteration's prompts, and this process's share of them
        idx = iteration_prompts(it, len(prompts), cfg.rollout_prompts, cfg.seed)[shard.first:shard.first + shard.count]
        batch_prompts = [prompts[i] for i in idx]
        # 2.2 sync and generate (per-row seeds: the same iteration always samples the same responses, on any
        # process)
        params_s = SamplingParams(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + it,
                                  first_prompt=shard.first)
        timing["time/sync"] = team.sync()
        t0 = time.perf_counter()
        samples = team.generate(batch_prompts, params_s)
        timing["time/generate"] = time.perf_counter() - t0
        # 3. score
        t0 = time.perf_counter()
        row_prompts = [batch_prompts[i] for i in samples.prompt_index.tolist()]
        row_meta = [metadata[idx[i]] for i in samples.prompt_index.tolist()]
        raw_scores, finished, scores, monitored = score(cfg, team, row_prompts, row_meta, samples, shard)
        if (notice := missing_eos_notice(finished, cfg, it + 1, eos_warned)) and main:
            tqdm.write(notice)
            eos_warned = True
        timing["time/score"] = time.perf_counter() - t0
        # 4.–5. old and reference log-probs, values, rewards and advantages
        rollout = experience(cfg, team, samples, scores, beta, device, timing, shard)
        # 6. PPO epochs over minibatches
        t0 = time.perf_counter()
        sums, tokens_seen, train_tokens, updates, stopped_early, policy_logprobs = update_policy(
            cfg, team, rollout, beta, it, state, shard, ckpt_root)
        timing["time/train"] = time.perf_counter() - t0
        # (B, R) over the whole batch from here on
        mask, ref_logprobs = shard.gather(rollout.response_mask), shard.gather(rollout.ref_logprobs)
        kl_seq = ((shard.gather(policy_logprobs) - ref_logprobs) * mask).sum(1)  # (B,) k1 per sequence
        lr = team.lr_step()
        # 7. adaptive β, logs, samples, checkpoint
        kl_mean = float(kl_seq.mean())
        if cfg.adaptive_kl:
            state["beta"] = rl.adaptive_kl_coef(beta, kl_mean, cfg.kl_target, cfg.kl_horizon, len(raw_scores))
        state["step"] += 1
        state["episodes"] += len(raw_scores)
        n_gen = float(mask.sum())
        metrics = {
            "ppo/score": float(raw_scores.mean()), "ppo/score_after_rules": float(shard.gather(scores).mean()),
            **monitored,
            "ppo/kl": kl_mean, "ppo/sqrt_kl": math.sqrt(max(kl_mean, 0.0)), "ppo/beta": beta,
            **{f"ppo/{k}": float(v if k.endswith("_max") else v / max(tokens_seen, 1))
               for k, v in (sums._asdict().items() if sums else []) if v is not None},
            "ppo/updates": updates, "ppo/early_stopped": int(stopped_early), "train/lr": lr,
            "rollout/length": n_gen / len(raw_scores), "rollout/eos_rate": float(finished.float().mean()),
            "perf/generate_tokens_per_s": n_gen / max(timing["time/generate"], 1e-9),
            "perf/train_tokens_per_s": train_tokens / max(timing["time/train"], 1e-9), **timing,
        }
        if rollout.engine_logprobs is not None:
            metrics.update(engine_mismatch(cfg, shard.gather(policy_logprobs), shard.gather(rollout.engine_logprobs),
                                           mask))
        if rollout.values is not None:
            values = shard.gather(rollout.values)
            metrics["ppo/explained_variance"] = float(rl.explained_variance(values, shard.gather(rollout.returns),
                                                                            mask))
            metrics["ppo/value_mean"] = float(masked_mean(values, mask))
        history.append(metrics)
        alarms = rl.watch(history, cfg.watch_window)
        metrics.update({f"watch/{kind}": float(kind in {a.kind for a in alarms}) for kind in rl.ALARMS})
        for alarm in alarms:
            if alarm.kind not in raised and main:
                tqdm.write(f"warning: iteration {state['step']}: {alarm.message}")
            raised.add(alarm.kind)
        metrics["time/iteration"] = time.perf_counter() - t_iteration  # the phases above, and what joins them
        if it % cfg.log_steps == 0 or state["step"] == cfg.iterations:
            tracker.log(state["step"], metrics)
        if main and cfg.sample_every and (it % cfg.sample_every == 0 or state["step"] == cfg.iterations):
            with samples_path.open("a") as f:
                for k in range(min(4, len(samples.texts))):
                    f.write(json.dumps({"iteration": state["step"], "prompt": row_prompts[k],
                                        "response": samples.texts[k], "score": float(raw_scores[k]),
                                        "finished": bool(samples.finished[k])}) + "\n")
        bar.update(1)
        bar.set_postfix(score=f"{metrics['ppo/score']:.3f}", kl=f"{kl_mean:.3f}")
        if cfg.save_steps and (state["step"] % cfg.save_steps == 0 or state["step"] == cfg.iterations):
            team.save(ckpt_root, state["step"], state)
    bar.close()

    # 8. the final policy as a Hugging Face directory
    final = {**metrics, "train/iterations": state["step"], "train/nonfinite_skipped": state["nonfinite_skipped"],
             "ppo/critic_init": team.critic_init}
    team.finish(out, tok, final)
    tracker.close()
    release_output(out)
    accelerator.wait_for_everyone()
    return final
