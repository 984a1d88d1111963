"""The pipeline's report: report.md and report.html from the stage directories, with the plots it draws.

Built as a list of blocks (heading, paragraph, table, image) rendered twice: markdown with the PNGs beside it, and
one self-contained HTML page with the PNGs inlined. Every number is read back from the stages' own outputs
(eval.json, run.json, metrics.jsonl, best-of-n samples), never recomputed from memory of the run.

Over-optimisation views (Gao et al. 2022; Bai et al. 2022 Fig. 13):
- along PPO: the proxy (the RM PPO optimises), the gold score and, with the robustness check, the held-out RM,
  per iteration against √KL(π ‖ π_SFT) measured on the rollouts;
- along best-of-n: the expected proxy and gold score of the best of n SFT samples (every n-subset of the N drawn,
  `core.losses.best_of_n_value`) against √KL_BoN = √(log n − (n−1)/n);
- each of those scores fitted as a·√KL + b (`core.losses.linear_fit`), the HH paper's relation, with the slope's
  interval and R², beside the same fit against KL.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import torch

from rlhfkit.core.losses import LinearFit, best_of_n_kl, best_of_n_value, elo_bootstrap, elo_ratings, linear_fit
from rlhfkit.evaluate import winrates
from rlhfkit.sim import tasks
from rlhfkit.tracking import read_metrics

Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows) | ("img", path, caption)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(d: Path) -> list[dict]:
    return read_metrics(d) if (d / "metrics.jsonl").is_file() else []


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def bon_curve(out: Path) -> dict[str, list[float]] | None:
    """Expected proxy and gold of best-of-n for n = 1, 2, 4, … ≤ N, from best_of_n/samples.jsonl."""
    path = out / "best_of_n" / "samples.jsonl"
    if not path.is_file():
        return None
    prompt_rows = [json.loads(line) for line in (out / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    n_max = max(r["sample_index"] for r in rows) + 1
    proxy = torch.zeros(len(prompt_rows), n_max, dtype=torch.float64)
    gold = torch.zeros_like(proxy)
    for r in rows:
        i, j = r["prompt_index"], r["sample_index"]
        proxy[i, j] = r["score"]
        gold[i, j] = tasks.gold_score(tasks.from_row(prompt_rows[i]), r["response"])
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_max]
    return {"n": ns, "sqrt_kl": [math.sqrt(best_of_n_kl(n)) for n in ns],
            "proxy": [float(best_of_n_value(proxy, proxy, n).mean()) for n in ns],
            "gold": [float(best_of_n_value(proxy, gold, n).mean()) for n in ns]}


def ppo_scores(rows: list[dict]) -> dict[str, str]:
    """The scores PPO logged per iteration, by their name in the report: the proxy it optimised, the gold score and
    any held-out RM (--monitor rm:DIR)."""
    names = {"ppo/score": "proxy RM (optimised)", "monitor/gold_reward": "gold score"}
    names |= {k: f"held-out RM ({k.removeprefix('monitor/rm_')})" for k in (rows[0] if rows else {})
              if k.startswith("monitor/rm_")}
    return {k: v for k, v in names.items() if rows and k in rows[0]}


def sqrt_kl_fits(ppo_rows: list[dict], bon: dict | None) -> list[tuple[str, str, LinearFit, LinearFit]]:
    """Each score along PPO (per iteration) and along best-of-n (per n) fitted as a·√KL + b, and as a·KL + b for
    contrast: (along, score, √KL fit, KL fit). Along PPO a point is an iteration's mean over its rollouts. A run
    whose √KL never moved (a short one's sampled KL estimate can stay at or below 0, logged as √KL 0) has no fit."""
    fits = []
    if len(ppo_rows) >= 3 and len({r["ppo/sqrt_kl"] for r in ppo_rows}) > 1:
        x = [r["ppo/sqrt_kl"] for r in ppo_rows]
        for key, name in ppo_scores(ppo_rows).items():
            y = [r[key] for r in ppo_rows]
            fits.append(("PPO", name, linear_fit(x, y), linear_fit([v * v for v in x], y)))
    if bon is not None and len(bon["n"]) >= 3 and len(set(bon["sqrt_kl"])) > 1:
        for key, name in (("proxy", "proxy RM (selects)"), ("gold", "gold score")):
            fits.append(("best-of-n", name, linear_fit(bon["sqrt_kl"], bon[key]),
                         linear_fit([v * v for v in bon["sqrt_kl"]], bon[key])))
    return fits


def verdict(fit: LinearFit, against_kl: LinearFit) -> str:
    """Whether the HH paper's relation (reward roughly linear in √KL) describes these points."""
    if fit.slope_lo > 0:
        trend = "rises" + (" linearly in √KL" if fit.r2 >= 0.5 else ", noisily")
    elif fit.slope_hi < 0:
        trend = "falls"
    else:
        trend = "no trend the points can tell from noise"
    better = "√KL" if fit.r2 >= against_kl.r2 else "KL"
    return f"{trend}; a line in {better} fits better (R² {fit.r2:.2f} against {against_kl.r2:.2f})"


def plot_overoptimisation(out: Path, bon: dict | None, path: Path) -> Path | None:
    ppo_rows = _metrics(out / "ppo")
    if not ppo_rows and bon is None:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    ax = axes[0]
    if ppo_rows:
        # points coloured by iteration (in iteration order they wander: √KL is not monotone); each score's fit
        x = [r["ppo/sqrt_kl"] for r in ppo_rows]
        iteration = list(range(1, len(ppo_rows) + 1))
        span = [min(x), max(x)]
        for (key, name), marker, colour in zip(ppo_scores(ppo_rows).items(), "os^v", ("C0", "C1", "C2", "C3")):
            y = [r[key] for r in ppo_rows]
            dots = ax.scatter(x, y, c=iteration, cmap="viridis", marker=marker, edgecolors=colour, linewidths=1.2,
                              s=36, label=name)
            if len(x) >= 3 and span[1] > span[0]:
                fit = linear_fit(x, y)
                ax.plot(span, [fit.intercept + fit.slope * v for v in span], "--", color=colour, lw=1.2,
                        label=f"fit: {fit.slope:+.2f}·√KL {fit.intercept:+.2f} (R² {fit.r2:.2f})")
        fig.colorbar(dots, ax=ax, label="PPO iteration")
    ax.set_title("PPO iterations")
    ax.set_xlabel("√KL(π ‖ π_SFT) (nats^½, per sequence)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    ax = axes[1]
    if bon is not None:
        ax.plot(bon["sqrt_kl"], bon["proxy"], "o-", label="proxy RM (selects)")
        ax.plot(bon["sqrt_kl"], bon["gold"], "s-", label="gold score")
        for n, x, y in zip(bon["n"], bon["sqrt_kl"], bon["gold"]):
            ax.annotate(f"n={n}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, -10))
    ax.set_title("best-of-n on the evaluation prompts")
    ax.set_xlabel("√KL_BoN = √(log n − (n−1)/n)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(out: Path, path: Path) -> Path | None:
    panels = [("sft", "train/loss", "SFT loss"), ("rm", "train/loss", "RM loss"), ("dpo", "train/loss", "DPO loss"),
              ("ppo", "ppo/score", "PPO proxy score")]
    panels = [(d, k, t) for d, k, t in panels if _series(_metrics(out / d), k)[0]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (d, key, title) in zip(axes[0], panels):
        rows = _metrics(out / d)
        ax.plot(*_series(rows, key), lw=1.2, label=key)
        if d == "rm":
            ax.set_ylabel("loss", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(*_series(rows, "train/accuracy"), color="tab:orange", lw=1, label="accuracy")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("training batch accuracy", fontsize=8, color="tab:orange")
        if d == "ppo" and _series(rows, "monitor/gold_reward")[0]:
            ax.plot(*_series(rows, "monitor/gold_reward"), lw=1.2, label="gold score")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step" if d != "ppo" else "iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_final(d: Path) -> dict:
    p = d / "run.json"
    return json.loads(p.read_text()).get("final_metrics", {}) if p.is_file() else {}


def blocks(out: Path, cfg: Any, summaries: dict, seconds: dict, speed: dict | None = None) -> list[Block]:
    ev = json.loads((out / "eval" / "eval.json").read_text())
    names = list(ev["models"])
    sft = "sft" if "sft" in names else names[0]
    prompts = summaries.get("data", {}).get("prompts", {})
    b: list[Block] = [("h1", "rlhfkit pipeline report"),
                      ("p", f"Base model {cfg.model}, preset {cfg.preset}, built-in task with "
                            f"{'simulated labellers' if cfg.feedback == 'sim' else 'people in the labelling app'}. "
                            f"Prompts: {prompts.get('sft', '?')} SFT demonstrations, {prompts.get('rm', '?')} RM "
                            f"prompts × {cfg.k} ranked responses, {prompts.get('rl', '?')} PPO prompts, "
                            f"{ev['prompts']} held-out evaluation prompts judged by the gold score. "
                            f"Total time {sum(seconds.values()) / 60:.1f} min.")]
    return b + results_blocks(out, ev, names, sft) + online_blocks(out, cfg, ev, summaries) \
        + reward_model_blocks(out) + overoptimisation_blocks(out, cfg) + stage_blocks(ev, names, summaries, seconds,
                                                                                       speed)


def results_blocks(out: Path, ev: dict, names: list[str], sft: str) -> list[Block]:
    """Elo, gold score, win rate against SFT (and its games won, lost and tied), KL and length; the gold score per
    family; the win-rate matrix."""
    b: list[Block] = []
    rows = []
    for m in names:
        s = ev["models"][m]
        lo, hi = ev["elo_interval"][m]
        wr = ev["win_rates"].get(m, {}).get(sft)
        rows.append([m, f"{ev['elo'][m]:.0f} ({lo:.0f}–{hi:.0f})", f"{s['mean_score']:.3f}",
                     f"{wr['win_rate']:.3f} ({wr['lo']:.3f}–{wr['hi']:.3f})" if wr else "—",
                     f"{wr['wins']} / {wr['losses']} / {wr['ties']}" if wr and "wins" in wr else "—",
                     f"{s['kl_to_reference']:.2f}" if "kl_to_reference" in s else "—", f"{s['mean_length']:.1f}"])
    b += [("h2", "Results on held-out prompts"),
          ("table", ["model", "Elo (95% CI)", "mean gold score", f"win rate vs {sft} (95% CI)",
                     f"won / lost / tied vs {sft}", "KL to SFT", "mean length (tokens)"], rows),
          ("p", "Win rates count ties as half a win; intervals are Wilson score intervals; Elo is the Bradley–Terry "
                "maximum-likelihood fit on the Elo scale (mean 1000) with bootstrap intervals over prompts. A tie "
                "is a prompt both models answer equally well by the gold score (often perfectly), so where many "
                "tie, a win rate far above 0.5 needs most of the remaining prompts won.")]
    if (out / "eval" / "elo.png").is_file():
        b.append(("img", out / "eval" / "elo.png", "Elo of every model (95% bootstrap intervals)"))
    fams = [k for k in ev["models"][names[0]] if k.startswith("score/")]
    if fams:
        b += [("h2", "Helpful and harmless: gold score per prompt family"),
              ("table", ["model"] + [f.split("/")[1] for f in fams],
               [[m] + [f"{ev['models'][m][f]:.3f}" for f in fams] for m in names]),
              ("p", "The harmful family rewards a polite refusal with an alternative; the others reward doing what "
                    "was asked, so a model that refuses everything, or complies with everything, loses somewhere.")]
    b += [("h2", "Win-rate matrix"), ("table", [""] + names, [
        [a] + [f"{ev['win_rates'][a][c]['win_rate']:.2f}" if c in ev["win_rates"].get(a, {}) else "—" for c in names]
        for a in names])]
    return b


def chat_games(cfg: Any, policies: dict[str, str]) -> list[tuple[str, str, float]]:
    """People's A/B choices in the labelling app's chat between two of the run's models (served from their
    directories: `rlhfkit label serve --model OUTPUT/ppo --model OUTPUT/sft`), the models named as in the report."""
    from rlhfkit.feedback.progress import comparison_games

    if cfg.feedback == "sim":
        return []
    name_of = {str(Path(path).resolve()): name for name, path in policies.items()}
    games = [(name_of.get(str(Path(a).resolve())), name_of.get(str(Path(b).resolve())), o)
             for a, b, o in comparison_games(cfg.feedback.removeprefix("db:"))]
    return [(a, b, o) for a, b, o in games if a and b]


def online_blocks(out: Path, cfg: Any, ev: dict, summaries: dict) -> list[Block]:
    """Each online round: its rankings, RM, PPO and held-out win rate, and the labellers' Elo of the models shown so
    far from the rankings themselves (every ranking of responses by different models is a set of games,
    `winrates.ranking_games`); with people, their chat A/B choices between the run's models as a last row."""
    if not cfg.online_rounds:
        return []
    policies = {"sft": str(out / "sft"), "ppo": str(out / "ppo")}
    policies |= {f"ppo-round{r}": str(out / f"round{r}" / "ppo") for r in range(1, cfg.online_rounds + 1)}
    who = "people" if cfg.feedback != "sim" else "simulated labellers"
    rows, games, clusters, elo_rows = [], [], [], []
    for r in range(1, cfg.online_rounds + 1):
        rd = out / f"round{r}"
        ranked = [json.loads(line) for line in (rd / "comparisons" / "rankings.jsonl").read_text().splitlines()]
        shown = [m for m in reversed(policies) if any(m in row["models"] for row in ranked)]
        for i, row in enumerate(ranked):
            played = winrates.ranking_games(row["models"], row["ranking"])
            games += played
            clusters += [(r, i)] * len(played)
        ppo = summaries.get(f"round{r}/ppo", {})
        wr = ev["win_rates"].get(f"ppo-round{r}", {}).get("sft")
        rows.append([r, ", ".join(shown), f"{len(ranked)} ({len({row['labeller'] for row in ranked})})",
                     f"{_run_final(rd / 'rm').get('rm/accuracy', float('nan')):.3f}",
                     f"{ppo.get('ppo/score', float('nan')):.3f} / {ppo.get('monitor/gold_reward', float('nan')):.3f}",
                     f"{wr['win_rate']:.3f} ({wr['lo']:.3f}–{wr['hi']:.3f})" if wr else "—"])
        elo_rows.append((f"after round {r}", games[:], clusters[:]))
    chat = chat_games(cfg, policies)
    if chat:
        elo_rows.append(("and chat A/B choices", games + chat,
                         clusters + [("chat", i) for i in range(len(chat))]))
    b: list[Block] = [
        ("h2", "Online rounds"),
        ("table", ["round", "models ranked (newest first)", "rankings (labellers)", "RM held-out accuracy",
                   "PPO proxy / gold, last iteration", "gold win rate vs sft (95% CI)"], rows),
        ("p", f"Each round's rankings are of responses written by the models named, taking turns, and ranked by "
              f"{who}; its RM trained on every round's rankings so far, and its PPO started again from SFT. The win "
              "rate is the held-out evaluation's.")]
    names = list(policies)
    table = []
    for label, g, c in elo_rows:
        elo = elo_ratings(g) if g else {}
        ci = elo_bootstrap(g, n=200, seed=cfg.seed, clusters=c) if g else {}
        table.append([label, len(g)] + [f"{elo[m]:.0f} ({ci[m][0]:.0f}–{ci[m][1]:.0f})" if m in elo else "—"
                                        for m in names])
    b += [("h2", f"Elo from the {who}, round by round"),
          ("table", ["judged", "games"] + names, table),
          ("p", f"The Bradley–Terry fit (mean 1000) to every game so far: each ranking of responses by different "
                f"models plays one game per pair of them, a tie half a win each; intervals resample whole rankings "
                f"(200 resamples). A round's rankings judge the policies before it, so the last round's policy is "
                f"judged by the gold score alone. — : not yet shown to the {who}.")]
    return b


def reward_model_blocks(out: Path) -> list[Block]:
    b: list[Block] = []
    rm_rows = []
    for d in ("rm", "rm_heldout"):
        f = _run_final(out / d)
        if f:
            acc, n = f.get("rm/accuracy", float("nan")), int(f.get("rm/pairs", 0))
            interval = "({:.3f}–{:.3f})".format(*winrates.wilson_interval(acc * n, n)) if n else ""
            rm_rows.append([d, f"{acc:.3f} {interval}", n, f"{f.get('rm/ece', float('nan')):.3f}",
                            f"{f.get('rm/margin', float('nan')):.3f}"])
    if rm_rows:
        b += [("h2", "Reward model"),
              ("table", ["reward model", "held-out accuracy (95% CI)", "held-out pairs", "ECE", "mean margin"], rm_rows),
              ("p", "Accuracy: the share of held-out pairs the RM orders as the labeller did (ties excluded), with a "
                    "Wilson interval that counts the pairs as independent; the pairs of one ranking are not, so the "
                    "interval is somewhat too narrow.")]
        if (out / "rm" / "reliability.png").is_file():
            b.append(("img", out / "rm" / "reliability.png", "Calibration: predicted σ(r_A − r_B) against the "
                                                             "observed frequency on held-out comparisons"))
    return b


def overoptimisation_blocks(out: Path, cfg: Any) -> list[Block]:
    """Proxy and gold reward against √KL along PPO and best-of-n, and the training curves."""
    b: list[Block] = []
    bon = bon_curve(out)
    over = plot_overoptimisation(out, bon, out / "reward_vs_sqrt_kl.png")
    if over:
        b += [("h2", "Over-optimisation: proxy and gold reward against √KL"),
              ("p", "Left: PPO iterations (rollouts on the RL prompts); the proxy is the RM PPO optimises, the gold "
                    "score is the hidden truth the simulated labellers judge by" +
                    (", and the held-out RM was trained on comparisons of its own, none of the proxy's (the HH "
                     "paper's robustness check)" if cfg.robustness else "") +
                    ". Right: best-of-n on the evaluation prompts. Where the proxy climbs and the gold score does "
                    "not, the policy is exploiting the reward model."),
              ("img", over, "Reward against √KL along PPO and along best-of-n")]
        if bon:
            b.append(("table", ["n", "√KL", "proxy", "gold"],
                      [[n, f"{x:.2f}", f"{p:.3f}", f"{g:.3f}"] for n, x, p, g in
                       zip(bon["n"], bon["sqrt_kl"], bon["proxy"], bon["gold"])]))
        fits = sqrt_kl_fits(_metrics(out / "ppo"), bon)
        if fits:
            b += [("h2", "Is reward linear in √KL?"),
                  ("table", ["along", "score", "slope per √KL (95% CI)", "intercept", "R²", "points",
                             "the HH relation here"],
                   [[along, name, f"{f.slope:+.3f} ({f.slope_lo:+.3f} to {f.slope_hi:+.3f})", f"{f.intercept:+.3f}",
                     f"{f.r2:.2f}", f.n, verdict(f, k)] for along, name, f, k in fits]),
                  ("p", "Bai et al. (2022) found the preference model's score roughly linear in √KL(π ‖ π_0) along RL "
                        "training. Each row is a least-squares line a·√KL + b through the points in the plot above "
                        "(PPO: one per iteration, each the mean of its rollouts; best-of-n: n = 1, 2, 4, …), with "
                        "the slope's t interval, which treats the points as independent (PPO's iterations are not "
                        "quite); the last column also fits a·KL + b to the same points.")]
    b += alarm_blocks(out, cfg)
    curves = plot_training(out, out / "training_curves.png")
    if curves:
        b += [("h2", "Training curves"), ("img", curves, "SFT, RM and DPO losses per step; PPO scores per iteration")]
    return b


ALARM_NAMES = {"proxy_up_heldout_down": "proxy up while a held-out score falls", "kl_growth": "KL growth",
               "entropy_collapse": "entropy collapse", "length_drift": "response-length drift"}


def alarm_blocks(out: Path, cfg: Any) -> list[Block]:
    """The over-optimisation alarms each PPO run logged (watch/KIND per iteration, `core.rl.watch`)."""
    runs = [("ppo", out / "ppo")] + [(f"round{r}/ppo", out / f"round{r}" / "ppo")
                                     for r in range(1, cfg.online_rounds + 1)]
    rows, watched = [], False
    for name, d in runs:
        logged = _metrics(d)
        for kind, label in ALARM_NAMES.items():
            raised = [r["step"] for r in logged if r.get(f"watch/{kind}")]
            watched |= any(f"watch/{kind}" in r for r in logged)
            if raised:
                rows.append([name, label, raised[0], f"{len(raised)} of {len(logged)}"])
    if not watched:
        return []
    b: list[Block] = [("h2", "Over-optimisation alarms")]
    if rows:
        b.append(("table", ["PPO run", "alarm", "first raised at iteration", "iterations raised"], rows))
    else:
        b.append(("p", "No PPO run raised an alarm."))
    b.append(("p", "Each iteration compares the last few iterations' logs with the ones before (ppo --watch-window): "
                   "the proxy score rising while the held-out RM or the gold score falls beyond noise, KL to SFT "
                   "doubling above 1 nat, the policy's entropy halving, the mean response length moving by half "
                   "again since the first iterations. The run's log printed each alarm when first raised."))
    return b


def stage_blocks(ev: dict, names: list[str], summaries: dict, seconds: dict, speed: dict | None) -> list[Block]:
    """Each stage's time and summary, the machine's speed, and examples."""
    b: list[Block] = []
    b += [("h2", "Stages"), ("table", ["stage", "minutes", "summary"],
                             [[k, f"{v / 60:.2f}", _short(summaries.get(k, {}))] for k, v in seconds.items()])]
    if speed:
        b.append(("p", f"Machine speed ({speed['matmul_dtype']} 2048² matmul): {speed['matmul_gflops_start']:.0f} "
                       f"GFLOP/s before the first stage, {speed['matmul_gflops_end']:.0f} after the last: one measure "
                       "of the machine's speed, not all of it (memory-bound work can slow down while matmuls do not); "
                       "stages skipped as complete keep the times of the run that made them."))
    ex_rows = [[m, e["prompt"], e["response"], f"{e['score']:.2f}"] for m in names for e in
               ev["models"][m].get("examples", [])[:2]]
    b += [("h2", "Examples"), ("table", ["model", "prompt", "response", "gold"], ex_rows)]


    return b


def _short(summary: dict) -> str:
    items = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
             if not isinstance(v, dict)]
    return ", ".join(items[:6])


def _cell_md(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ⏎ ")


def to_markdown(bs: list[Block], out: Path) -> str:
    lines = []
    for blk in bs:
        if blk[0] in ("h1", "h2"):
            lines += [("# " if blk[0] == "h1" else "## ") + blk[1], ""]
        elif blk[0] == "p":
            lines += [blk[1], ""]
        elif blk[0] == "table":
            lines += ["| " + " | ".join(map(_cell_md, blk[1])) + " |", "|" + "---|" * len(blk[1])]
            lines += ["| " + " | ".join(map(_cell_md, r)) + " |" for r in blk[2]] + [""]
        elif blk[0] == "img":
            lines += [f"![{blk[2]}]({Path(blk[1]).relative_to(out)})", ""]
    return "\n".join(lines)


def to_html(bs: list[Block]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
             "content='width=device-width, initial-scale=1'><title>rlhfkit pipeline report</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left;vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}"
             "img{max-width:100%}figcaption{color:#555;font-size:13px}</style></head><body>"]
    for blk in bs:
        if blk[0] in ("h1", "h2"):
            parts.append(f"<{blk[0]}>{e(blk[1])}</{blk[0]}>")
        elif blk[0] == "p":
            parts.append(f"<p>{e(blk[1])}</p>")
        elif blk[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in blk[1]) + "</tr>" +
                         "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2]) +
                         "</table>")
        elif blk[0] == "img":
            data = base64.b64encode(Path(blk[1]).read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{e(blk[2])}'>"
                         f"<figcaption>{e(blk[2])}</figcaption></figure>")
    return "\n".join(parts) + "</body></html>\n"


def write(out: Path, cfg: Any, summaries: dict, seconds: dict, speed: dict | None = None) -> dict[str, Path]:
    bs = blocks(out, cfg, summaries, seconds, speed)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(bs, out))
    page.write_text(to_html(bs))
    return {"md": md, "html": page}
