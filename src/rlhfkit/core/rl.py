"""PPO and critic-free policy-gradient maths for language models: pure tensor functions, no model, no I/O; and the
alarms a PPO run's logs raise (`watch`).

Shapes: B rows (sampled responses), R response tokens; `mask` (B, R) is 1 on response tokens. Per-token
functions return (B, R) tensors and leave the aggregation to the caller, so a minibatch split into micro-batches
is normalised by the tokens of the whole minibatch. Equations and conventions: ALGORITHMS.md; papers: Schulman
et al. 2017 (PPO), Ziegler et al. 2019 (adaptive KL), Shao et al. 2024 (GRPO), Ahmadian et al. 2024 (RLOO),
Hu 2025 (REINFORCE++), Huang et al. 2024 ("The N+ implementation details of RLHF with PPO").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from rlhfkit.core.losses import kl_penalized_rewards, masked_mean, masked_whiten


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_eps: float = 0.2
                        ) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) and the ratio ρ = exp(log π − log π_old); (B, R)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return loss, ratio


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """Per-token 0.5·max((V − R)², (clip(V, V_old ± c) − R)²) and whether the clipped branch was taken; (B, R)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped_sq, clipped_sq), clipped_sq > unclipped_sq


def approx_kl(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Per token 0.5·(log π − log π_old)², whose mean over response tokens says how far one update moved the
    policy (Schulman's k2 estimator); (B, R)."""
    return 0.5 * (logprobs - old_logprobs) ** 2


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of each row's categorical distribution; logits (N, V) -> (N,) fp32."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var(R − V)/Var(R) over response tokens: 1 for a perfect critic, ≤ 0 for a useless one."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_r.clamp(min=1e-8)


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al. 2019: e = clip(KL/target − 1, ±0.2); β ← β·(1 + e·n/horizon); KL = mean Σ_t kl_t."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_episodes / horizon)


def broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence value (B,) on every response token: (B, R), 0 off the mask."""
    return per_sequence[:, None].to(mask.dtype) * mask


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024): (r_i − mean)/(std + eps) within each prompt's group of n samples; scores (B,) with
    B = prompts × n in prompt-major order -> (B,). std is the unbiased sample std (as DeepSeekMath and TRL)."""
    groups = scores.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): r_i − mean_{j≠i} r_j within each prompt's group; (B,) -> (B,)."""
    groups = scores.view(-1, group_size)
    loo_mean = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - loo_mean).view(-1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{k≥t} γ^{k−t} r_k over response tokens; (B, R) -> (B, R), 0 off the mask."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                            estimator: str = "k1") -> Tensor:
    """REINFORCE++ (Hu 2025): per-token −β·KL plus the score on the last token, returns (γ = 1) as advantages,
    whitened over the valid tokens of the whole batch; (B, R)."""
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    return masked_whiten(discounted_returns(rewards, mask), mask)


# --- rollouts sampled by another engine ---------------------------------------------------------------------

CORRECTIONS = ("none", "token-tis", "seq-mask")


def rollout_correction(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, mode: str, cap: float
                       ) -> Tensor:
    """Importance weights (B, R) for the policy loss when the tokens were sampled by an engine (vLLM) whose
    numerics differ from the trainer's: the sampling distribution is π_engine, the loss assumes π_trainer.
    ρ = π_trainer / π_engine per token; in "seq-mask" the sequence's ρ = exp(Σ_t (log π_trainer − log π_engine)).

      none:      1
      token-tis: min(ρ_t, cap), truncated importance sampling per token (Yao et al. 2025; OpenRLHF's and veRL's
                 token-level correction)
      seq-mask:  ρ_seq where ρ_seq ≤ cap, else 0 for the whole sequence (TRL GRPO's default "sequence_mask")

    Inputs (B, R); the log-probs carry no gradient (they are the old policy's). Off-mask tokens get weight 0."""
    if mode == "none":
        return mask.to(trainer_logprobs.dtype)
    diff = (trainer_logprobs - engine_logprobs) * mask  # (B, R) log ρ_t, 0 off the mask
    if mode == "token-tis":
        return diff.exp().clamp(max=cap) * mask
    if mode == "seq-mask":
        ratio = diff.sum(-1, keepdim=True).exp()  # (B, 1)
        return ratio.masked_fill(ratio > cap, 0.0) * mask
    raise ValueError(f"rollout correction {mode!r}: expected one of {', '.join(CORRECTIONS)}")


def engine_mismatch_kl(trainer_logprobs: Tensor, engine_logprobs: Tensor) -> Tensor:
    """Per token k3 estimate of KL(π_engine ‖ π_trainer) from tokens the engine sampled: (ρ − 1) − log ρ with
    ρ = π_trainer / π_engine; ≥ 0, and 0 exactly where the two agree. (B, R)."""
    log_ratio = trainer_logprobs - engine_logprobs
    return log_ratio.exp() - 1 - log_ratio


class Alarm(NamedTuple):
    """One sign of over-optimisation or collapse in a PPO run's logs: `kind` names it in the logs (watch/KIND)."""

    kind: str
    message: str


ALARMS = ("proxy_up_heldout_down", "kl_growth", "entropy_collapse", "length_drift")
KL_ALARM_NATS = 1.0  # KL per sequence below which its growth is not worth an alarm, however fast
COLLAPSE = 0.5  # entropy below this fraction of the first iterations' is a collapse
DRIFT = 1.5  # response length this many times longer (or shorter) than in the first iterations is a drift


def _window(history: Sequence[Mapping[str, float]], key: str, start: int, stop: int) -> list[float]:
    return [row[key] for row in history[start:stop] if key in row]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _fell(before: list[float], after: list[float]) -> bool:
    """The mean fell by more than twice the standard error of the difference (each window's own spread)."""
    def var(v: list[float]) -> float:
        m = _mean(v)
        return sum((a - m) ** 2 for a in v) / max(len(v) - 1, 1)

    drop = _mean(before) - _mean(after)
    return drop > 0 and drop > 2 * math.sqrt(var(before) / len(before) + var(after) / len(after))


def watch(history: Sequence[Mapping[str, float]], window: int) -> list[Alarm]:
    """The alarms the logs of a PPO run raise at its latest iteration (history: one metrics row per iteration,
    oldest first), comparing its last `window` iterations with the `window` before them (and with its first):
    - the proxy score rose while a held-out score (monitor/gold_reward, monitor/rm_*: the test PM) fell beyond
      noise (Gao et al. 2022; Bai et al. 2022 §4.3): the policy is exploiting the reward model;
    - KL to the reference at least doubled and is above KL_ALARM_NATS per sequence, from 3·window iterations on:
      the first rollouts are the reference's own (KL 0), and the climb from there as training starts is no alarm;
    - the policy's entropy fell below COLLAPSE of the first iterations';
    - the mean response length moved by a factor DRIFT from the first iterations'.
    Nothing before 2·window iterations."""
    n = len(history)
    if window < 1 or n < 2 * window:
        return []
    before, after = (n - 2 * window, n - window), (n - window, n)
    alarms = []
    proxy_old, proxy_new = _window(history, "ppo/score", *before), _window(history, "ppo/score", *after)
    rise = _mean(proxy_new) - _mean(proxy_old) if proxy_old and proxy_new else 0.0
    for key in [k for k in history[-1] if k == "monitor/gold_reward" or k.startswith("monitor/rm_")]:
        old, new = _window(history, key, *before), _window(history, key, *after)
        if rise > 0 and old and new and _fell(old, new):
            alarms.append(Alarm("proxy_up_heldout_down",
                                f"the proxy score rose by {rise:+.3f} over the last {window} iterations while {key} "
                                f"fell by {_mean(new) - _mean(old):+.3f}: the policy may be exploiting the reward "
                                "model"))
            break
    kl_old, kl_new = _window(history, "ppo/kl", *before), _window(history, "ppo/kl", *after)
    if n >= 3 * window and kl_old and kl_new and _mean(kl_new) > KL_ALARM_NATS \
            and _mean(kl_new) >= 2 * max(_mean(kl_old), 1e-9):
        alarms.append(Alarm("kl_growth", f"KL to the reference grew from {_mean(kl_old):.2f} to {_mean(kl_new):.2f} "
                                         f"nats per sequence over the last {2 * window} iterations"))
    for key, kind, test, what in (
            ("ppo/entropy", "entropy_collapse", lambda first, last: last < COLLAPSE * first, "entropy"),
            ("rollout/length", "length_drift", lambda first, last: not 1 / DRIFT <= last / max(first, 1e-9) <= DRIFT,
             "mean response length")):
        first, last = _window(history, key, 0, window), _window(history, key, *after)
        if first and last and test(_mean(first), _mean(last)):
            alarms.append(Alarm(kind, f"the {what} went from {_mean(first):.3g} in the first {window} iterations to "
                                      f"{_mean(last):.3g} in the last {window}"))
    return alarms
