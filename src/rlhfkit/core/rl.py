"""PPO and critic-free policy-gradient maths for language models: pure tensor functions, no model, no I/O.

Shapes: B rows (sampled responses), R response tokens; `mask` (B, R) is 1 on response tokens. Per-token
functions return (B, R) tensors and leave the aggregation to the caller, so a minibatch split into micro-batches
is normalised by the tokens of the whole minibatch. Equations and conventions: ALGORITHMS.md; papers: Schulman
et al. 2017 (PPO), Ziegler et al. 2019 (adaptive KL), Shao et al. 2024 (GRPO), Ahmadian et al. 2024 (RLOO),
Hu 2025 (REINFORCE++), Huang et al. 2024 ("The N+ implementation details of RLHF with PPO").
"""

from __future__ import annotations

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
