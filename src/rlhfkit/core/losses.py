"""The losses and estimators of the RLHF recipe as plain tensor functions (SPEC §5, ALGORITHMS.md).

Everything here is batch-first maths: no model, no I/O, no config. Shapes use B = batch (prompts or
sequences), T = tokens, K = responses of one prompt, N = responses of all prompts in a batch.
Masks are 1 on response tokens and 0 on prompt and padding.
"""

import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1; over everything, or along `dim`."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens of the whole batch; x, mask [B, T].

    Biased variance, as in the OpenAI lm-human-preferences code. With shift_mean=False the mean is
    added back, so the result is only rescaled (used for rewards). Masked positions come out 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# DPO family (Rafailov et al. 2023; IPO: Azar et al. 2023; cDPO: Mitchell 2023)


def dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # cDPO: the label is flipped with probability eps; eps = 0 is the original -log σ(βh).
    return (1 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)


def dpo_ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO regresses h towards 1/(2β). Summed log-probs, as in the paper (TRL length-normalises).
    if label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": dpo_ipo,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example DPO loss and implicit rewards. All inputs [B]: summed response log-probs.

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l));
    "sigmoid": (1−ε)·softplus(−βh) + ε·softplus(βh) (ε = label_smoothing, cDPO; ε = 0 is DPO Eq. 7);
    "ipo": (h − 1/(2β))² (Azar et al. 2023, Eq. 17).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards β(log π − log π_ref), detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------------------------------------
# Reward model (InstructGPT Eq. 1)


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley–Terry loss mean(−log σ(r_c − r_r − margin)); scores [B], margin [B], scalar or None."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


Ranking = Sequence[int | Sequence[int]]


def ranking_pairs(ranking: Ranking) -> list[tuple[int, int]]:
    """All (winner, loser) pairs of a best-first ranking; a nested list is a tie group.

    [2, [0, 3], 1] -> (2,0) (2,3) (2,1) (0,1) (3,1): tied responses form no pair.
    """
    groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in ranking]
    flat = [i for group in groups for i in group]
    if len(flat) != len(set(flat)):
        raise ValueError(f"ranking names a response twice: {ranking}")
    return [(w, l) for g, above in enumerate(groups) for below in groups[g + 1 :] for w in above for l in below]


def best_worst_pair(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Of one comparison's (winner, loser) pairs, the one between the response that wins most often and the one
    that loses most often (the first on a tie): the best against the worst of a ranking or of scored responses.
    [] for no pairs.

    [2, [0, 3], 1]'s pairs (2,0) (2,3) (2,1) (0,1) (3,1) -> [(2, 1)]."""
    if not pairs:
        return []
    wins: dict[int, int] = {}
    losses: dict[int, int] = {}
    for w, l in pairs:
        wins[w] = wins.get(w, 0) + 1
        losses[l] = losses.get(l, 0) + 1
    best = max(wins, key=lambda i: (wins[i], -i))
    worst = max(losses, key=lambda i: (losses[i], -i))
    return [(best, worst)]


def grouped_ranking_loss(scores: Tensor, groups: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """InstructGPT RM loss for a batch of prompts whose responses are scored once each.

    scores [N]: every response of every prompt, flat. groups: one list per prompt of (winner, loser)
    indices into `scores`. Each prompt's loss is the mean over its pairs and the batch loss the mean
    over prompts, so a prompt weighs the same whatever its K. Prompts without pairs (all tied) are
    left out; a batch without any pair gives 0 (still attached to the graph).
    """
    counts = [len(pairs) for pairs in groups if pairs]
    if not counts:
        return scores.sum() * 0.0
    winners = torch.tensor([w for pairs in groups for w, _ in pairs], device=scores.device)
    losers = torch.tensor([l for pairs in groups for _, l in pairs], device=scores.device)
    # weight of a pair = 1 / (pairs of its prompt) / (prompts with pairs)
    weights = torch.tensor([1.0 / (c * len(counts)) for c in counts for _ in range(c)], device=scores.device)
    pair_losses = -F.logsigmoid(scores[winners] - scores[losers])  # [P]
    return (pair_losses * weights.to(scores.dtype)).sum()


def ranking_loss(scores: Tensor, ranking: Ranking) -> Tensor:
    """Mean of −log σ(s_w − s_l) over the ordered pairs of one prompt's ranking; scores [K].

    A full ranking of K responses gives C(K,2) pairs; ties give fewer (see `ranking_pairs`).
    """
    return grouped_ranking_loss(scores, [ranking_pairs(ranking)])


# ---------------------------------------------------------------------------------------------
# Context distillation (Askell et al. 2021, §3.4)


def token_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(M,) fp32 KL(p_teacher ‖ p_student) at each of M positions, over the whole vocabulary, from logits (M, V):
    Σ_v p_T(v) (log p_T(v) − log p_S(v)). Exact, not a sampled estimate: both distributions are at hand."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


# ---------------------------------------------------------------------------------------------
# PPO: per-token rewards and advantages (Ziegler et al. 2019; InstructGPT Eq. 2; Schulman et al. 2016)


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # Schulman's "Approximating KL divergence" k3: unbiased and always >= 0.
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled-token log-probs [B, T].

    k1 = log π − log π_ref; k3 = (π_ref/π − 1) − log(π_ref/π) (http://joschu.net/blog/kl-approx.html).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


def kl_penalized_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tensor:
    """Per-token PPO rewards [B, T]: −kl_coef·kl_t on every response token, plus score [B] on the last one.

    The score goes on the last token where mask is 1 (the EOS token), not on the first padding
    token after it, the bug of TRL's former PPO. Rows with an empty mask get no score.
    """
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_estimate(logprobs, ref_logprobs, estimator) * mask  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # [B] index of the last response token
    has_response = mask.amax(dim=1)  # [B] 0 for an empty row
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += score.to(rewards.dtype) * has_response
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens; all [B, T].

    δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}, returns R_t = A_t + V_t. Positions with mask 0
    count as V = 0 and r = 0, so V = 0 after the last valid token; responses must be contiguous.
    Advantages and returns are 0 where mask is 0. No whitening here.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------
# Evaluation: Elo by Bradley–Terry maximum likelihood, best-of-n KL


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN ‖ π) = log n − (n−1)/n (Stiennon et al. 2020, App. G.3; an upper bound if samples repeat)."""
    return math.log(n) - (n - 1) / n


def best_of_n_value(proxy: Tensor, value: Tensor, n: int) -> Tensor:
    """E[value of the sample with the highest proxy among n drawn without replacement from N], per prompt.

    proxy, value: (P, N) scores of N samples per prompt (e.g. reward model and gold score) -> (P,). The unbiased
    estimator of Gao et al. 2022 (App. of "Scaling laws for reward model overoptimization"): sort by proxy; the
    sample of rank i (1-based, ascending) is the best of a random n-subset with probability C(i−1, n−1) / C(N, n).
    Using every subset at once, rather than the first n samples, gives the curve for every n ≤ N with far less
    noise. Proxy ties are broken by position.
    """
    N = proxy.shape[-1]
    if not 1 <= n <= N:
        raise ValueError(f"n must be in 1..{N}, got {n}")
    order = proxy.argsort(dim=-1, stable=True)
    ranks = torch.arange(1, N + 1, dtype=torch.float64)
    # C(i−1, n−1) / C(N, n) via log-gamma; zero where i − 1 < n − 1
    log_w = torch.lgamma(ranks) - torch.lgamma(torch.tensor(float(n))) - torch.lgamma(ranks - n + 1) \
        - (math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1))
    weights = torch.where(ranks >= n, log_w.exp(), torch.zeros_like(ranks))
    return (value.double().gather(-1, order) * weights).sum(-1)


def _strongly_connected(beats: Tensor) -> bool:
    # Zermelo/Ford: the BT maximum exists iff every player can be reached from every other along "beat"
    # edges. Transitive closure by repeated squaring of the boolean reachability matrix.
    reach = beats | torch.eye(len(beats), dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(len(beats))))):
        reach = reach | ((reach.double() @ reach.double()) > 0)
    return bool(reach.all())


def _fit_bradley_terry(wins: Tensor, tol: float = 1e-10, max_iter: int = 200) -> Tensor:
    # Newton ascent on ℓ(θ) = Σ_ij W_ij log σ(ln10·(θ_i − θ_j)), W_ij = (fractional) wins of i over j.
    # ℓ is concave and shift-invariant: the pseudo-inverse picks the step with Σ Δ = 0.
    games = wins + wins.T

    def loglik(theta: Tensor) -> Tensor:
        # log σ(x) = −softplus(−x); F.logsigmoid is ~100x slower in float64 on CPU
        return -(wins * F.softplus(-LN10 * (theta[:, None] - theta[None, :]))).sum()

    theta = torch.zeros(len(wins), dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(LN10 * (theta[:, None] - theta[None, :]))  # P(i beats j)
        grad = LN10 * (wins - games * p).sum(dim=1)
        curvature = LN10**2 * games * p * (1 - p)
        hessian = torch.diag(curvature.sum(dim=1)) - curvature  # −∇²ℓ, a weighted graph Laplacian
        step = torch.linalg.pinv(hessian) @ grad
        # Halve the step until ℓ does not fall: plain Newton can overshoot from far away.
        base, t = loglik(theta), 1.0
        while loglik(theta + t * step) < base and t > 1e-6:
            t /= 2
        theta = theta + t * step
        if (t * step).abs().max() < tol:
            break
    return theta


def elo_ratings(games: Sequence[tuple[str, str, float]]) -> dict[str, float]:
    """Bradley–Terry maximum-likelihood ratings on the Elo scale.

    games: (a, b, outcome), outcome 1 if a won, 0 if b won, 0.5 for a tie (half a win each way).
    P(a beats b) = σ(ln10·(θ_a − θ_b)); Elo = 400θ + 1000 with Σθ = 0, so the mean rating is 1000.
    Fitted by Newton's method in float64 to a step below 1e-10.

    The maximum is finite only when the "beat" graph is strongly connected (Zermelo/Ford); otherwise,
    e.g. when a player wins every game, each player gets one extra virtual tie against a virtual
    player, who is then dropped. This prior keeps ratings finite and is used only in that case.
    """
    names = list(dict.fromkeys(name for a, b, _ in games for name in (a, b)))
    index = {name: i for i, name in enumerate(names)}
    # counted in Python floats, then one tensor: indexing a tensor per game made this 100× slower, and the
    # bootstrap calls it a thousand times
    counts = [[0.0] * len(names) for _ in names]
    for a, b, outcome in games:
        if not 0.0 <= outcome <= 1.0:
            raise ValueError(f"outcome must be in [0, 1], got {outcome} for {a} vs {b}")
        counts[index[a]][index[b]] += outcome
        counts[index[b]][index[a]] += 1.0 - outcome
    wins = torch.tensor(counts, dtype=torch.float64)
    if not _strongly_connected(wins > 0):
        wins = F.pad(wins, (0, 1, 0, 1))
        wins[-1, :-1] = wins[:-1, -1] = 0.5  # one virtual tie of each player with the virtual player
        theta = _fit_bradley_terry(wins)[:-1]
    else:
        theta = _fit_bradley_terry(wins)
    theta = theta - theta.mean()
    return {name: 1000.0 + 400.0 * float(t) for name, t in zip(names, theta)}


def elo_bootstrap(
    games: Sequence[tuple[str, str, float]], n: int = 1000, seed: int = 0, clusters: Sequence[Hashable] | None = None
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of `elo_ratings`, resampling with replacement n times.

    clusters: one key per game (its prompt, its ranking); whole clusters are resampled, since the games of one
    prompt or one ranking are not independent. None: every game is its own cluster.
    A player missing from a resample is left out of that resample's draws.
    """
    rng = random.Random(seed)
    groups: dict[Hashable, list] = {}
    for i, game in enumerate(games):
        groups.setdefault(i if clusters is None else clusters[i], []).append(game)
    blocks = list(groups.values())
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        sample = [g for block in rng.choices(blocks, k=len(blocks)) for g in block]
        for name, rating in elo_ratings(sample).items():
            draws.setdefault(name, []).append(rating)
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    intervals = {}
    for name, ratings in draws.items():
        lo, hi = torch.quantile(torch.tensor(ratings, dtype=torch.float64), quantiles).tolist()
        intervals[name] = (lo, hi)
    return intervals


# ---------------------------------------------------------------------------------------------
# Evaluation: reward against √KL, a straight line with an honest interval


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (the half-width factor of a 95% interval),
    by bisection on the exact two-sided CDF for integer df (Abramowitz & Stegun 26.7.3–4): with θ = atan(t/√df),
    P(|T| ≤ t) = sin θ·Σ_{k<df/2} c_k cos^{2k} θ for even df (c_0 = 1, c_k = c_{k−1}·(2k−1)/(2k)), and
    (2/π)·(θ + sin θ·cos θ·Σ_{k<(df−1)/2} d_k cos^{2k} θ) for odd df (d_0 = 1, d_k = d_{k−1}·2k/(2k+1))."""
    if df < 1:
        raise ValueError("t_quantile_975 needs df ≥ 1")

    def two_sided(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2, s = math.cos(theta) ** 2, math.sin(theta)
        if df % 2 == 0:
            total, term = 0.0, 1.0
            for k in range(df // 2):
                total += term
                term *= c2 * (2 * k + 1) / (2 * k + 2)
            return s * total
        total, term = 0.0, 1.0
        for k in range((df - 1) // 2):
            total += term
            term *= c2 * (2 * k + 2) / (2 * k + 3)
        return 2 / math.pi * (theta + s * math.cos(theta) * total)

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


class LinearFit(NamedTuple):
    """y ≈ slope·x + intercept by least squares over n points; r2 the share of y's variance the line explains;
    the slope's 95% interval assumes independent normal residuals (t with n − 2 degrees of freedom; nan below 3
    points)."""

    slope: float
    intercept: float
    r2: float
    slope_lo: float
    slope_hi: float
    n: int


def linear_fit(x: Sequence[float], y: Sequence[float]) -> LinearFit:
    """Ordinary least squares of y on x (the HH paper's reward ≈ a·√KL + b, with x = √KL)."""
    n = len(x)
    if n < 2 or n != len(y):
        raise ValueError("linear_fit needs two or more (x, y) pairs")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("linear_fit needs x values that differ")
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    sse = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    sst = sum((b - my) ** 2 for b in y)
    r2 = 1 - sse / sst if sst > 0 else 1.0
    if n < 3:
        return LinearFit(slope, intercept, r2, math.nan, math.nan, n)
    half = t_quantile_975(n - 2) * math.sqrt(sse / (n - 2) / sxx)
    return LinearFit(slope, intercept, r2, slope - half, slope + half, n)
