"""PPO and critic-free estimators, against values worked out by hand from the equations (ALGORITHMS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.core import rl
from rlhfkit.core.losses import gae


def test_clipped_policy_loss_by_hand():
    # ρ = e^{log π − log π_old}: token 1 ρ = 1.5 with A = +1 -> max(−1.5, −1.2) = −1.2 (clipped at 1 + ε)
    # token 2 ρ = 0.5 with A = +1 -> max(−0.5, −0.8) = −0.5 (unclipped: the pessimistic branch)
    # token 3 ρ = 0.5 with A = −2 -> max(1.0, 1.6) = 1.6 (clipped at 1 − ε)
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5)]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, ratio = rl.clipped_policy_loss(new, old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 1.6]]))
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 0.5]]))


def test_clipped_value_loss_by_hand():
    # V_old = 0, c = 0.2. V = 1, R = 1: unclipped 0, clipped (0.2 − 1)² = 0.64 -> 0.5·0.64 = 0.32, clipped branch
    # V = 0.1, R = 1: unclipped 0.81, clipped (0.1 − 1)² = 0.81 -> 0.405 (equal: not counted as clipped)
    values, old, returns = torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    loss, clipped = rl.clipped_value_loss(values, old, returns, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405]]))
    assert clipped.tolist() == [[True, False]]


def test_gae_equals_a_plain_reverse_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b in range(3):
        n = int(mask[b].sum())
        expected, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0  # V = 0 after the last valid token
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            expected[t] = last
        torch.testing.assert_close(adv[b, :n], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
        assert adv[b, n:].abs().sum() == 0


def test_approx_kl_and_explained_variance():
    mask = torch.ones(1, 2)
    kl = rl.approx_kl(torch.tensor([[0.2, -0.5]]), torch.tensor([[0.0, -0.2]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5 * 0.04, 0.5 * 0.09]]))  # 0.5·(0.2)², 0.5·(−0.3)²
    returns = torch.tensor([[1.0, 3.0]])  # Var(R) = 1
    assert rl.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # V = R − (0.5, −0.5): Var(R − V) = 0.25 -> 1 − 0.25 = 0.75
    assert rl.explained_variance(returns - torch.tensor([[0.5, -0.5]]), returns, mask).item() == pytest.approx(0.75)


def test_entropy_of_uniform_and_peaked():
    assert rl.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert rl.entropy_from_logits(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller():
    # KL = 12, target 6: e = clip(1, ±0.2) = 0.2; n = 512, horizon 10000 -> β = 0.1·(1 + 0.2·0.0512) = 0.101024
    assert rl.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 512) == pytest.approx(0.101024)
    # KL = 5.4: e = −0.1 -> β = 0.1·(1 − 0.1·0.0512) = 0.099488
    assert rl.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 512) == pytest.approx(0.099488)


def test_grpo_advantages_by_hand():
    # group (1, 2, 3): mean 2, unbiased std 1 -> (−1, 0, 1)/(1 + 1e-4); group (5, 5, 5): std 0 -> 0
    adv = rl.grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    d = 1 + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0]))


def test_rloo_advantages_by_hand():
    # group (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> (−3, −1.5, 4.5)
    adv = rl.rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 2.0, 4.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -3.0, 0.0, 3.0]))


def test_reinforce_pp_advantages_by_hand():
    # one row, 2 tokens, β = 0.5, k1 = (0.2, 0.4): rewards (−0.1, −0.2 + 1) -> returns (0.7, 0.8);
    # whitened over the 2 tokens: mean 0.75, biased var 0.0025 -> (−0.05, 0.05)/sqrt(0.0025 + 1e-8)
    adv = rl.reinforce_pp_advantages(torch.tensor([1.0]), torch.tensor([[0.2, 0.4]]), torch.zeros(1, 2),
                                     torch.ones(1, 2), kl_coef=0.5)
    s = math.sqrt(0.0025 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[-0.05 / s, 0.05 / s]]), atol=1e-4, rtol=1e-4)


def test_discounted_returns_stop_at_the_mask():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(rl.discounted_returns(r, mask, gamma=0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]]))


def test_rollout_correction_by_hand():
    # two rows of two tokens; log ρ = log π_trainer − log π_engine
    # row 0: ρ = (2, 0.5) -> token-tis with cap 1.5: (1.5, 0.5); sequence ρ = 1 ≤ 1.5 -> seq-mask (1, 1)
    # row 1: ρ = (4, e^0 = 1) but token 2 is padding -> token-tis (1.5, 0); sequence ρ = 4 > 1.5 -> masked: (0, 0)
    engine = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])
    trainer = engine + torch.tensor([[math.log(2.0), math.log(0.5)], [math.log(4.0), 0.7]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(rl.rollout_correction(trainer, engine, mask, "token-tis", 1.5),
                               torch.tensor([[1.5, 0.5], [1.5, 0.0]]))
    torch.testing.assert_close(rl.rollout_correction(trainer, engine, mask, "seq-mask", 1.5),
                               torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # below the cap the sequence keeps its ratio as the weight: row 1's ρ = 4 with cap 5
    torch.testing.assert_close(rl.rollout_correction(trainer, engine, mask, "seq-mask", 5.0)[1],
                               torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(rl.rollout_correction(trainer, engine, mask, "none", 1.5), mask)
    with pytest.raises(ValueError, match="token-tis"):
        rl.rollout_correction(trainer, engine, mask, "tis", 1.5)


@pytest.mark.parametrize("mode", rl.CORRECTIONS)
def test_rollout_correction_with_identical_logprobs_changes_nothing(mode):
    logps = torch.log_softmax(torch.randn(3, 5, 7), -1)[..., 0]  # (3, 5)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    torch.testing.assert_close(rl.rollout_correction(logps, logps.clone(), mask, mode, 2.0), mask)
    torch.testing.assert_close(rl.engine_mismatch_kl(logps, logps.clone()), torch.zeros(3, 5))


def test_engine_mismatch_kl_by_hand():
    # ρ = 2: (2 − 1) − log 2 = 0.30685; ρ = 0.5: −0.5 + log 2 = 0.19315
    kl = rl.engine_mismatch_kl(torch.tensor([math.log(2.0), math.log(0.5)]), torch.zeros(2))
    torch.testing.assert_close(kl, torch.tensor([1 - math.log(2.0), math.log(2.0) - 0.5]))


def rows(**series) -> list[dict]:
    n = len(next(iter(series.values())))
    return [{key: values[i] for key, values in series.items()} for i in range(n)]


def test_watch_raises_each_alarm_by_hand():
    """window 2: the last two iterations against the two before (and, for entropy and length, the first two)."""
    kinds = lambda h: [a.kind for a in rl.watch(h, 2)]  # noqa: E731
    # gold 1.00, 1.02 → 0.50, 0.52: a drop of 0.5 against 2·SE = 2·√(0.0002/2 + 0.0002/2) = 0.028, proxy up by 1
    assert kinds(rows(**{"ppo/score": [0, 0, 1, 1], "monitor/gold_reward": [1.0, 1.02, 0.5, 0.52]})) == [
        "proxy_up_heldout_down"]
    # the same fall with the proxy flat is not this alarm; a noisy held-out RM (0.5 ± 0.71 → 0.7) is not either
    assert kinds(rows(**{"ppo/score": [1, 1, 1, 1], "monitor/gold_reward": [1.0, 1.02, 0.5, 0.52]})) == []
    assert kinds(rows(**{"ppo/score": [0, 0, 1, 1], "monitor/rm_heldout": [1, 0, 1, 0.4]})) == []
    # KL 0.4 → 1.3 nats from iterations 3-4 to 5-6: at least doubled and above 1; 0.4 → 0.8 doubled but small; the
    # same climb within the first five iterations, from the reference's own rollouts at KL 0, is training starting
    assert kinds(rows(**{"ppo/kl": [0.0, 0.4, 0.3, 0.5, 1.2, 1.4]})) == ["kl_growth"]
    assert kinds(rows(**{"ppo/kl": [0.0, 0.4, 0.3, 0.5, 0.7, 0.9]})) == []
    assert kinds(rows(**{"ppo/kl": [0.3, 0.5, 1.2, 1.4]})) == kinds(rows(**{"ppo/kl": [0.0, 0.3, 0.5, 1.2, 1.4]})) == []
    # entropy 2 → 0.9 (below half); length 10 → 16 (over 1.5×) but not 10 → 14
    assert kinds(rows(**{"ppo/entropy": [2, 2, 0.9, 0.9]})) == ["entropy_collapse"]
    assert kinds(rows(**{"rollout/length": [10, 10, 16, 16]})) == ["length_drift"]
    assert kinds(rows(**{"rollout/length": [10, 10, 14, 14], "ppo/entropy": [2, 2, 1.1, 1.1]})) == []
    # too few iterations to compare, or the watch off
    assert rl.watch(rows(**{"ppo/kl": [0.3, 5, 9]}), 2) == [] and rl.watch(rows(**{"ppo/kl": [0.3, 5]}), 0) == []
    message = rl.watch(rows(**{"ppo/score": [0, 0, 1, 1], "monitor/gold_reward": [1.0, 1.02, 0.5, 0.52]}), 2)[0]
    assert message.message.startswith("the proxy score rose by +1.000 over the last 2 iterations while "
                                      "monitor/gold_reward fell by -0.500")
