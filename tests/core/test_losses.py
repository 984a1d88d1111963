"""Unit tests of rlhfkit.core.losses. Every expected value is derived by hand from the equations in
ALGORITHMS.md (in the docstring or comment beside it) and computed with `math`, never with the function
under test."""

import math
import random

import pytest
import torch

from rlhfkit.core.losses import (
    best_of_n_kl,
    best_of_n_value,
    dpo_loss,
    elo_bootstrap,
    linear_fit,
    t_quantile_975,
    elo_ratings,
    gae,
    grouped_ranking_loss,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    pairwise_loss,
    ranking_loss,
    ranking_pairs,
    best_worst_pair,
)


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^−x)."""
    return math.log(1 + math.exp(-x))


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# --- DPO -------------------------------------------------------------------------------------------
# Example 0: chosen log-ratio −5 − (−10) = 5, rejected −15 − (−10) = −5, so h = 10 and βh = 1 at β = 0.1.
# Example 1: chosen and rejected swapped, so h = −10 and βh = −1.
DPO_INPUTS = (
    torch.tensor([-5.0, -15.0]),  # policy chosen
    torch.tensor([-15.0, -5.0]),  # policy rejected
    torch.tensor([-10.0, -10.0]),  # ref chosen
    torch.tensor([-10.0, -10.0]),  # ref rejected
)


def test_dpo_sigmoid():
    """L = −log σ(βh): log(1 + e^−1) ≈ 0.3133 for h = 10, log(1 + e) ≈ 1.3133 for h = −10."""
    losses, _, _ = dpo_loss(*DPO_INPUTS, beta=0.1)
    close(losses, [neg_log_sigmoid(1.0), neg_log_sigmoid(-1.0)])


def test_dpo_label_smoothing():
    """cDPO with ε = 0.1: 0.9·softplus(−βh) + 0.1·softplus(βh); softplus(−1) = log(1 + e^−1), softplus(1) = log(1 + e)."""
    losses, _, _ = dpo_loss(*DPO_INPUTS, beta=0.1, label_smoothing=0.1)
    sp_minus, sp_plus = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    close(losses, [0.9 * sp_minus + 0.1 * sp_plus, 0.9 * sp_plus + 0.1 * sp_minus])


def test_dpo_ipo():
    """IPO: (h − 1/(2β))² with 1/(2·0.1) = 5: (10 − 5)² = 25 and (−10 − 5)² = 225; h = 5 gives 0."""
    losses, _, _ = dpo_loss(*DPO_INPUTS, beta=0.1, loss_type="ipo")
    close(losses, [25.0, 225.0])
    at_target, _, _ = dpo_loss(*(torch.tensor([x]) for x in (0.0, 0.0, -5.0, 0.0)), beta=0.1, loss_type="ipo")
    close(at_target, [0.0])


def test_dpo_implicit_rewards_are_detached():
    """Rewards β(log π − log π_ref): chosen 0.1·5 = 0.5, rejected 0.1·(−5) = −0.5 in example 0."""
    policy_chosen = DPO_INPUTS[0].clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, *DPO_INPUTS[1:], beta=0.1)
    close(chosen_rewards, [0.5, -0.5])
    close(rejected_rewards, [-0.5, 0.5])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert losses.requires_grad


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="ipo.*sigmoid"):
        dpo_loss(*DPO_INPUTS, loss_type="hinge")


# --- reward model ----------------------------------------------------------------------------------


def test_pairwise_loss():
    """Differences 1 and 0: mean(log(1 + e^−1), log 2) ≈ 0.5032."""
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    close(loss, (neg_log_sigmoid(1.0) + math.log(2)) / 2)


def test_pairwise_loss_margin():
    """Margin 1 shifts the differences to 0 and −1: mean(log 2, log(1 + e)) ≈ 1.0032; a per-pair margin too."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    close(pairwise_loss(chosen, rejected, margin=1.0), (math.log(2) + neg_log_sigmoid(-1.0)) / 2)
    # margins [1, −1]: differences 0 and 1
    close(pairwise_loss(chosen, rejected, margin=torch.tensor([1.0, -1.0])), (math.log(2) + neg_log_sigmoid(1.0)) / 2)


def test_ranking_pairs_with_tie():
    """2 over {0, 3} over 1: 3 + 2 = 5 pairs, none between the tied 0 and 3."""
    assert ranking_pairs([2, [0, 3], 1]) == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    with pytest.raises(ValueError):
        ranking_pairs([0, [1, 0]])


def test_ranking_loss_k4():
    """Scores s = [0, 3, 1, 2] ranked 1 > 3 > 2 > 0: the C(4,2) = 6 differences s_w − s_l are
    1, 2, 3 (from 1), 1, 2 (from 3), 1 (from 2): loss = (3·sp(1) + 2·sp(2) + sp(3))/6, sp(d) = log(1 + e^−d)."""
    scores = torch.tensor([0.0, 3.0, 1.0, 2.0])
    expected = (3 * neg_log_sigmoid(1) + 2 * neg_log_sigmoid(2) + neg_log_sigmoid(3)) / 6
    close(ranking_loss(scores, [1, 3, 2, 0]), expected)


def test_ranking_loss_with_tie():
    """Same scores ranked 1 > {3, 2} > 0: 5 pairs with differences 1, 2, 3 (from 1), 2 (3 over 0), 1 (2 over 0)."""
    scores = torch.tensor([0.0, 3.0, 1.0, 2.0])
    expected = (2 * neg_log_sigmoid(1) + 2 * neg_log_sigmoid(2) + neg_log_sigmoid(3)) / 5
    close(ranking_loss(scores, [1, [3, 2], 0]), expected)


def test_ranking_loss_all_tied_is_zero_not_nan():
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = ranking_loss(scores, [[0, 1]])
    close(loss.detach(), 0.0)
    loss.backward()
    close(scores.grad, [0.0, 0.0])


def test_grouped_ranking_loss_weighs_prompts_equally():
    """Prompt A (K = 2, flat indices 0–1): one pair with difference 1, loss sp(1) = log(1 + e^−1).
    Prompt B (K = 4, indices 2–5, all scores 0): 6 pairs each log 2, mean log 2.
    Prompt C: all tied, no pairs, left out. Batch loss = (sp(1) + log 2)/2 ≈ 0.5032,
    not the pair mean (sp(1) + 6 log 2)/7 ≈ 0.6389."""
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    groups = [ranking_pairs([0, 1]), [(2 + w, 2 + l) for w, l in ranking_pairs([0, 1, 2, 3])], []]
    close(grouped_ranking_loss(scores, groups), (neg_log_sigmoid(1.0) + math.log(2)) / 2)


def test_grouped_ranking_loss_without_pairs():
    close(grouped_ranking_loss(torch.tensor([1.0, 2.0]), [[], []]), 0.0)


# --- PPO rewards and advantages --------------------------------------------------------------------


def test_gae_three_tokens():
    """γ = 1, λ = 0.95, r = [0, 0, 1], V = [0.5, 0.6, 0.7], V = 0 after the last token:
    δ2 = 1 − 0.7 = 0.3,        A2 = 0.3
    δ1 = 0.7 − 0.6 = 0.1,      A1 = 0.1 + 0.95·0.3 = 0.385
    δ0 = 0.6 − 0.5 = 0.1,      A0 = 0.1 + 0.95·0.385 = 0.46575
    returns A + V = [0.96575, 0.985, 1.0]."""
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3))
    close(advantages, [[0.46575, 0.385, 0.3]])
    close(returns, [[0.96575, 0.985, 1.0]])


def test_gae_with_prompt_and_padding():
    """The same response after one prompt position (row 0) and right-padded (row 1): the values and
    rewards written at masked positions (9) are ignored, and advantages and returns are 0 there."""
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0], [0.0, 0.0, 1.0, 9.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0], [0.5, 0.6, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.0, 0.46575, 0.385, 0.3, 0.0], [0.46575, 0.385, 0.3, 0.0, 0.0]])
    close(returns, [[0.0, 0.96575, 0.985, 1.0, 0.0], [0.96575, 0.985, 1.0, 0.0, 0.0]])


def test_gae_discount():
    """γ = 0.5, λ = 1, V = 0: A_t is the discounted return, r = [0, 0, 1] -> [0.25, 0.5, 1]."""
    advantages, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(advantages, [[0.25, 0.5, 1.0]])


def test_kl_penalized_rewards_score_on_last_valid_token():
    """k1 = −1 − (−2) = 1 per token, kl_coef 0.1: −0.1 on each response token; score on the last one.
    Row 0: response of 2 tokens then padding -> score 5 at index 1 (not at the first pad, index 2).
    Row 1: full row -> score 7 at index 3. Row 2: one prompt position, response at 1–2 -> score 3 at 2."""
    logprobs = torch.full((3, 4), -1.0)
    ref_logprobs = torch.full((3, 4), -2.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    rewards = kl_penalized_rewards(torch.tensor([5.0, 7.0, 3.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    close(
        rewards,
        [[-0.1, 4.9, 0.0, 0.0], [-0.1, -0.1, -0.1, 6.9], [0.0, -0.1, 2.9, 0.0]],
    )


def test_kl_k3():
    """log π = 0, log π_ref = log 0.5: k3 = (0.5 − 1) − log 0.5 = ln 2 − 0.5 ≈ 0.1931; k1 = −log 0.5 = ln 2.
    Equal log-probs give 0 for both."""
    logprobs = torch.tensor([[0.0, -1.0]])
    ref_logprobs = torch.tensor([[math.log(0.5), -1.0]])
    close(kl_estimate(logprobs, ref_logprobs, "k3"), [[math.log(2) - 0.5, 0.0]])
    close(kl_estimate(logprobs, ref_logprobs, "k1"), [[math.log(2), 0.0]])
    rewards = kl_penalized_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, torch.ones(1, 2), 0.1, estimator="k3")
    close(rewards, [[-0.1 * (math.log(2) - 0.5), 1.0]])
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logprobs, ref_logprobs, "k9")


# --- masked statistics -----------------------------------------------------------------------------


def test_masked_mean():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 2.0)  # (1 + 3 + 2)/3
    close(masked_mean(x, mask, dim=1), [2.0, 2.0])


def test_masked_whiten_biased_variance():
    """Valid [1, 2, 3]: mean 2, biased variance (1 + 0 + 1)/3 = 2/3 (unbiased would be 1),
    so ±1/sqrt(2/3 + 1e-8) ≈ ±1.2247 around 0; with shift_mean=False the mean 2 is added back."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    close(masked_whiten(x, mask), [[-s, 0.0, s, 0.0]], tol=1e-9)
    close(masked_whiten(x, mask, shift_mean=False), [[2 - s, 2.0, 2 + s, 0.0]], tol=1e-9)


# --- Elo and best-of-n -----------------------------------------------------------------------------


def test_elo_two_players():
    """a wins 3 of 4: σ(ln10·Δθ) = 3/4 -> 10^Δθ = 3 -> Δθ = log10 3, Elo gap 400·log10 3 ≈ 190.85, mean 1000."""
    ratings = elo_ratings([("a", "b", 1)] * 3 + [("a", "b", 0)])
    gap = 400 * math.log10(3)
    assert ratings["a"] == pytest.approx(1000 + gap / 2, abs=1e-6)
    assert ratings["b"] == pytest.approx(1000 - gap / 2, abs=1e-6)


def test_elo_ties_count_half():
    """a: one win and two ties = 2 wins of 3 -> odds 2, gap 400·log10 2 ≈ 120.41; the side a game is written from doesn't matter."""
    ratings = elo_ratings([("a", "b", 1), ("a", "b", 0.5), ("b", "a", 0.5)])
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(2), abs=1e-6)


def test_elo_three_players_consistent():
    """Win counts with odds a:b = 3, b:c = 2, a:c = 6 = 3·2 fit a BT model exactly, so the maximum
    likelihood reproduces them: gaps 400·log10 3, 400·log10 2 and 400·log10 6, mean 1000, any game order."""
    games = [("a", "b", 1)] * 3 + [("a", "b", 0)] + [("b", "c", 1)] * 2 + [("c", "b", 1)]
    games += [("a", "c", 1)] * 6 + [("a", "c", 0)]
    random.Random(0).shuffle(games)
    ratings = elo_ratings(games)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings["b"] - ratings["c"] == pytest.approx(400 * math.log10(2), abs=1e-6)
    assert ratings["a"] - ratings["c"] == pytest.approx(400 * math.log10(6), abs=1e-6)
    assert sum(ratings.values()) / 3 == pytest.approx(1000, abs=1e-9)


def test_elo_undefeated_player_stays_finite():
    """a beats everyone: no finite maximum without the virtual-tie prior; ratings stay finite and ordered."""
    ratings = elo_ratings([("a", "b", 1), ("a", "c", 1), ("b", "c", 1), ("c", "b", 1)])
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["a"] > ratings["b"] and ratings["b"] == pytest.approx(ratings["c"], abs=1e-6)
    assert sum(ratings.values()) / 3 == pytest.approx(1000, abs=1e-9)


def test_elo_bootstrap():
    games = [("a", "b", 1)] * 6 + [("a", "b", 0)] * 2 + [("b", "c", 1)] * 4 + [("b", "c", 0)] * 2
    ratings = elo_ratings(games)
    intervals = elo_bootstrap(games, n=200, seed=0)
    assert intervals == elo_bootstrap(games, n=200, seed=0)
    for name, (lo, hi) in intervals.items():
        assert lo < ratings[name] < hi


def test_elo_bootstrap_resamples_whole_clusters():
    """Each cluster holds a win and a loss of a against b: every resample of whole clusters is an even record, so the
    interval is the point 1000 for both; resampling single games does not keep them together and spreads it."""
    games = [("a", "b", 1), ("a", "b", 0)] * 10
    clustered = elo_bootstrap(games, n=100, seed=0, clusters=[i // 2 for i in range(20)])
    assert all(lo == pytest.approx(1000) and hi == pytest.approx(1000) for lo, hi in clustered.values())
    lo, hi = elo_bootstrap(games, n=100, seed=0)["a"]
    assert lo < 990 and hi > 1010


def test_best_of_n_kl():
    """log 16 − 15/16 = 2.7726 − 0.9375 ≈ 1.8351; n = 1 is the policy itself, KL 0."""
    assert best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)
    assert best_of_n_kl(1) == 0.0


def test_best_of_n_value_hand_worked():
    """N = 3 samples with proxies (0.1, 0.9, 0.5) and values (10, 30, 20). Sorted by proxy: values (10, 20, 30).
    n = 1: the mean, 20. n = 2: subsets {10,20} {10,30} {20,30} have best-by-proxy 20, 30, 30 -> 80/3; the
    weights C(i−1, 1)/C(3, 2) are (0, 1/3, 2/3): 20/3 + 60/3. n = 3: the top-proxy sample, 30."""
    proxy = torch.tensor([[0.1, 0.9, 0.5]])
    value = torch.tensor([[10.0, 30.0, 20.0]])
    assert best_of_n_value(proxy, value, 1).tolist() == pytest.approx([20.0])
    assert best_of_n_value(proxy, value, 2).tolist() == pytest.approx([80 / 3])
    assert best_of_n_value(proxy, value, 3).tolist() == pytest.approx([30.0])
    with pytest.raises(ValueError):
        best_of_n_value(proxy, value, 4)


def test_best_of_n_value_matches_enumerating_every_subset():
    import itertools

    g = torch.Generator().manual_seed(0)
    proxy, value = torch.rand(4, 7, generator=g), torch.randn(4, 7, generator=g)
    for n in (1, 3, 5):
        want = [sum(value[p, max(c, key=lambda k: proxy[p, k])].item() for c in itertools.combinations(range(7), n))
                / math.comb(7, n) for p in range(4)]
        assert best_of_n_value(proxy, value, n).tolist() == pytest.approx(want)


def test_token_kl_is_the_exact_forward_kl_of_the_two_softmaxes():
    from rlhfkit.core.losses import token_kl

    # teacher p = (1/2, 1/2); student p = (3/4, 1/4): KL = ½ ln(½ / ¾) + ½ ln(½ / ¼) = ½ ln(4/3)
    teacher = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    student = torch.tensor([[math.log(3.0), 0.0], [7.0, 4.0]])  # row 2: the teacher's logits shifted by 5
    kl = token_kl(student, teacher)
    assert kl.dtype == torch.float32 and kl.shape == (2,)
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)  # the same distribution
    # forward, not reverse: KL(student-as-teacher ‖ teacher-as-student) = ¾ ln(3/2) + ¼ ln(1/2) differs
    assert token_kl(teacher[:1], student[:1]).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


@pytest.mark.parametrize("df,table", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (14, 2.145),
                                      (30, 2.042)])
def test_t_quantile_975_matches_the_printed_table(df, table):
    assert t_quantile_975(df) == pytest.approx(table, abs=5e-4)


def test_linear_fit_by_hand():
    """x = 0..3, y = 0, 2, 1, 3: x̄ = ȳ = 1.5, Sxx = 5, Sxy = 4, so slope 0.8, intercept 0.3; residuals
    −0.3, 0.9, −0.9, 0.3 give SSE 1.8 of SST 5 (R² 0.64); SE(slope) = √(1.8/2/5) = 0.42426, × t(2) = 4.3027."""
    fit = linear_fit([0, 1, 2, 3], [0, 2, 1, 3])
    assert (fit.slope, fit.intercept, fit.r2, fit.n) == pytest.approx((0.8, 0.3, 0.64, 4))
    assert (fit.slope_lo, fit.slope_hi) == pytest.approx((0.8 - 4.3027 * 0.42426, 0.8 + 4.3027 * 0.42426), abs=1e-3)
    exact = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert (exact.slope, exact.intercept, exact.r2, exact.slope_lo, exact.slope_hi) == (2, 1, 1, 2, 2)
    assert math.isnan(linear_fit([0, 1], [0, 1]).slope_lo)
    with pytest.raises(ValueError):
        linear_fit([1, 1, 1], [0, 1, 2])


def test_best_worst_pair_by_hand():
    """[2, [0, 3], 1]: 2 wins thrice, 1 loses thrice; a tie at the top takes the first; scored pairs alike."""
    assert best_worst_pair(ranking_pairs([2, [0, 3], 1])) == [(2, 1)]
    assert best_worst_pair(ranking_pairs([[1, 0], 2])) == [(0, 2)]
    assert best_worst_pair([(0, 1)]) == [(0, 1)] and best_worst_pair([]) == []
