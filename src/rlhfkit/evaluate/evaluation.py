"""`rlhfkit eval`: responses of several models on held-out prompts, judged; win rates, Elo, scores and KL.

One run, top to bottom:
  1. prompts: `sim:SPLIT` (the built-in task's split, with gold-score metadata) or a prompts file
  2. every model samples one response per prompt (the rollout engine, same seed for every model); a
     responses:FILE entry brings its own responses (best-of-n, another system), matched by prompt
  3. the judge scores every response: `sim` (the gold score of the built-in task) or `rm:DIR` (a reward model)
  4. every pair of models meets on every prompt: the higher score wins, equal scores tie
  5. win-rate matrix with Wilson intervals, Elo (Bradley–Terry maximum likelihood, mean 1000) with bootstrap
     intervals, mean score (per family for sim prompts), response length, and, with --reference, the
     Monte-Carlo KL of each model to it on its own samples
  6. eval.json, eval.md and elo.png in OUTPUT

With `--judge db:FILE` steps 1–3 are replaced by the labelling app's A/B comparisons (each one a game between
the two models whose responses were compared), and step 5 has no scores or KL, only win rates and Elo.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit import UsageError, forward, models
from rlhfkit.config import write_run_json
from rlhfkit.core.losses import elo_bootstrap, elo_ratings
from rlhfkit.data import formats, io, sources
from rlhfkit.evaluate import winrates
from rlhfkit.rollout import EngineConfig, Samples, SamplingParams, make_engine
from rlhfkit.sim import tasks
from rlhfkit.tracking import check_output


@dataclass
class EvalConfig(EngineConfig):
    """rlhfkit eval: win rates, Elo, mean scores and KL of several models on held-out prompts."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    """Models to compare (aliases, Hugging Face directories, .gguf files or hub ids), or responses:FILE for
    responses made elsewhere (e.g. best-of-n's output): rows with messages, or prompt and response."""
    labels: list[str] = field(default_factory=list)
    """Names to show for --models, in the same order (default: the model names)."""
    prompts: str = "sim:eval"
    """sim:SPLIT (the built-in task's split, judged by its gold score) or a prompts file."""
    judge: str = "sim"
    """sim (gold score of the built-in task), rm:DIR (a reward model from `rlhfkit rm`) or db:FILE (people's A/B
    comparisons from `rlhfkit label serve`: no sampling; the models are those the comparisons name)."""
    output: str = "runs/eval"
    """Output directory: eval.json, eval.md, responses.jsonl (every response and score), elo.png, run.json."""
    reference: str | None = None
    """Model to measure each model's KL against (usually the SFT model)."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    max_new_tokens: int = 128
    """Longest response in tokens."""
    temperature: float = 0.7
    """Sampling temperature."""
    seed: int = 0
    """Sampling seed (the same for every model) and bootstrap seed."""
    batch_size: int = 16
    """Sequences per forward pass."""
    dtype: str = "auto"
    """Compute precision: auto, bf16, fp16 or fp32."""
    bootstrap: int = 1000
    """Bootstrap resamples for the Elo intervals."""


def load_prompts(cfg: EvalConfig) -> tuple[list[formats.Messages], list[tasks.Task | None]]:
    prompts, rows = formats.read(cfg.prompts, formats.to_prompt)
    keep = slice(cfg.limit or None)
    return [p.messages for p in prompts[keep]], [tasks.from_row(r.data) for r in rows[keep]]


LOGPS_BATCH_TOKENS = 8192  # padded tokens per forward of `response_logps`: bigger batches gain nothing here


@torch.no_grad()
def response_logps(model, samples: Samples, batch_size: int, precision: str) -> torch.Tensor:
    """log π(y|x) of each sample's response under `model`, (B,): the sequence log-prob of SPEC's notation.
    Each row is its prompt and response side by side without padding between or before them, right-padded to
    its batch's longest, the rows batched in order of length: `Samples` pads every prompt to the longest prompt
    and every response to the longest response of all (a base model's rambling one), most rows to much less.
    A batch's rows are one group (`forward.rows`): the tokens they all start with (the chat template's system turn
    and the user header, about 14 of a prompt's 30 in the default pipeline) run once."""
    net = forward.SelectedLogits(model, short_math_attention=False).eval()  # forward only: flash is faster
    device = next(model.parameters()).device
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(samples.prompt_ids, samples.prompt_mask)]
    responses = [ids[mask.bool()].tolist() for ids, mask in zip(samples.response_ids, samples.response_mask)]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    order = sorted(range(len(prompts)), key=lambda k: lengths[k])
    batches, start = [], 0  # up to batch_size rows and LOGPS_BATCH_TOKENS padded tokens each, shortest first
    for end in range(1, len(order) + 1):
        if end == len(order) or end - start == batch_size or (end + 1 - start) * lengths[order[end]] > \
                LOGPS_BATCH_TOKENS:
            batches.append(order[start:end])
            start = end
    out = torch.zeros(len(prompts))
    for rows in batches:
        batch = forward.rows([forward.Row(prompts[k] + responses[k], [0] * len(prompts[k]) + [1] * len(responses[k]))
                              for k in rows], samples.pad_id, [0] * len(rows))
        with models.autocast(device, precision):
            out[rows] = forward.sequence_logps(net, batch.to(device)).cpu()  # the head in chunks, never (M, V)
    return out


def file_responses(path: str, prompts: list[formats.Messages]) -> list[str]:
    """Responses from rows with `messages` (the last assistant turn answers the turns before it) or `prompt` and
    `response`, matched to the evaluation prompts by their message lists."""
    found: dict[str, str] = {}
    for row in io.read_rows(path):
        d = row.data
        if "messages" in d and d["messages"] and d["messages"][-1].get("role") == "assistant":
            prompt, response = d["messages"][:-1], d["messages"][-1]["content"]
        elif "prompt" in d and "response" in d:
            prompt = d["prompt"] if isinstance(d["prompt"], list) else [{"role": "user", "content": d["prompt"]}]
            response = d["response"]
        else:
            raise UsageError(f"{row.where}: expected messages ending with an assistant turn, or prompt and response")
        found.setdefault(json.dumps(prompt, sort_keys=True), response)
    missing = [i for i, p in enumerate(prompts) if json.dumps(p, sort_keys=True) not in found]
    if missing:
        raise UsageError(f"responses:{path} has no response for {len(missing)} of the {len(prompts)} prompts "
                         f"(the first: {prompts[missing[0]][-1]['content']!r})")
    return [found[json.dumps(p, sort_keys=True)] for p in prompts]


def load_judge(judge: sources.Source, task_list: list, precision: str):
    """The reward model of `--judge rm:DIR`; None for `sim`, the gold score, which needs the built-in task's
    prompts."""
    if judge.kind == "gold" and any(t is None for t in task_list):
        raise UsageError("--judge sim needs prompts of the built-in task (--prompts sim:eval, or rows with family "
                         "and params)")
    if judge.kind != "rm":
        return None
    from rlhfkit.reward_model import RewardModel

    return RewardModel.load(judge.value, models.device(), precision)


def judge_scores(rm, cfg: EvalConfig, prompts, task_list, texts: list[str], precision: str) -> torch.Tensor:
    """Step 3: the reward model's scores (`--judge rm:DIR`), or else the built-in task's gold scores."""
    if rm is not None:
        return rm.score(prompts, texts, cfg.batch_size, 2048, precision)[0]
    return torch.tensor([tasks.gold_score(t, r) for t, r in zip(task_list, texts)], dtype=torch.float64)


def evaluate_db(cfg: EvalConfig, db: str) -> dict:
    """Win rates and Elo from people's A/B comparisons in a labelling-app database."""
    from rlhfkit.feedback.progress import comparison_games
    from rlhfkit.feedback.store import StoreError

    try:
        games = comparison_games(db, option="--judge db:")
    except StoreError as e:
        raise UsageError(str(e)) from None
    explicit = cfg.models != EvalConfig().models
    if explicit:  # only the games between the models asked for
        games = [g for g in games if g[0] in cfg.models and g[1] in cfg.models]
    if not games:
        raise UsageError(f"--judge {cfg.judge}: no A/B comparisons between two different models"
                         + (f" among {', '.join(cfg.models)}" if explicit else ""))
    names = sorted({m for a, b, _ in games for m in (a, b)})
    played = {m: sum(m in (a, b) for a, b, _ in games) for m in names}
    result = {"prompts": len(games), "judge": cfg.judge, "games": len(games),
              "models": {m: {"games": played[m]} for m in names},
              "win_rates": winrates.win_rate_matrix(games), "elo": elo_ratings(games),
              "elo_interval": elo_bootstrap(games, n=cfg.bootstrap, seed=cfg.seed)}
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(markdown(result))
    final = {f"eval/elo/{m}": v for m, v in result["elo"].items()}
    write_run_json(out, cfg, "eval", final)
    plot_elo(result, out / "elo.png")
    return final


def evaluate(cfg: EvalConfig) -> dict:
    check_output(cfg.output, directory=True)
    judge = sources.parse(cfg.judge, "--judge", ("gold", "rm", "db"))
    if judge.kind == "db":
        return evaluate_db(cfg, judge.value)
    if len(cfg.models) < 1:
        raise UsageError("--models needs at least one model")
    entries = [sources.parse(m, "--models", ("responses", "model")) for m in cfg.models]
    names = model_names(cfg)
    precision = models.mixed_precision(cfg.dtype)
    # 1. prompts, and the judge
    prompts, task_list = load_prompts(cfg)
    rm = load_judge(judge, task_list, precision)
    params = SamplingParams(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    ref = None
    if cfg.reference:
        ref = models.load_causal_lm(cfg.reference, tokenizer=models.load_tokenizer(cfg.reference)).to(models.device())
        ref.eval()
        models.inference_weights(ref, precision)
    per_model: dict[str, dict] = {}
    scores: dict[str, torch.Tensor] = {}
    responses: dict[str, list[str]] = {}
    # response lengths of responses:FILE entries are counted with the reference's (or first model's) tokenizer
    length_tok = functools.cache(lambda: models.load_tokenizer(
        cfg.reference or next((e.value for e in entries if e.kind == "model"), "tiny-llama")))
    for spec, entry in zip(cfg.models, entries):
        name = names[spec]
        # 2. sample, or read the responses of a file
        samples = None
        if entry.kind == "responses":
            texts = file_responses(entry.value, prompts)
        else:
            tok = models.load_tokenizer(spec)
            model = models.load_causal_lm(spec, tokenizer=tok).to(models.device()).eval()
            models.inference_weights(model, precision)
            engine = make_engine(cfg, model, tok, cfg.batch_size, precision, progress=True, seed=cfg.seed)
            samples = engine.generate(prompts, params)
            del engine  # one model's engine at a time (vLLM holds its own copy of the weights)
            texts = samples.texts
        # 3. judge
        scores[name] = judge_scores(rm, cfg, prompts, task_list, texts, precision)
        responses[name] = texts
        lengths = samples.response_lengths.double() if samples is not None else \
            torch.tensor([len(length_tok().encode(t, add_special_tokens=False)) for t in texts], dtype=torch.float64)
        per_model[name] = model_stats(scores[name], lengths, samples, task_list, prompts, texts)
        if ref is not None and samples is not None:
            # the reference itself: exactly 0, two forward passes saved
            per_model[name]["kl_to_reference"] = 0.0 if spec == cfg.reference else float(
                (response_logps(model, samples, cfg.batch_size, precision)
                 - response_logps(ref, samples, cfg.batch_size, precision)).mean())
    # 4. every pair of models on every prompt
    pairs = list(itertools.combinations(list(per_model), 2))
    games = [(a, b, 1.0 if sa > sb else 0.0 if sa < sb else 0.5)
             for a, b in pairs for sa, sb in zip(scores[a].tolist(), scores[b].tolist())]
    prompt_of_game = list(range(len(prompts))) * len(pairs)  # the Elo interval resamples whole prompts
    # 5. win rates, Elo
    result = {"prompts": len(prompts), "judge": cfg.judge, "models": per_model}
    if games:
        result["win_rates"] = winrates.win_rate_matrix(games)
        result["elo"] = elo_ratings(games)
        result["elo_interval"] = elo_bootstrap(games, n=cfg.bootstrap, seed=cfg.seed, clusters=prompt_of_game)
    # 6. reports
    return write_results(cfg, result, prompts, task_list, responses, scores)


def model_names(cfg: EvalConfig) -> dict[str, str]:
    """Each --models entry's name in the results: its --labels entry, or itself."""
    if cfg.labels and len(cfg.labels) != len(cfg.models):
        raise UsageError(f"--labels names {len(cfg.labels)} models, --models {len(cfg.models)}")
    names = dict(zip(cfg.models, cfg.labels or cfg.models))
    if len(set(names.values())) < len(names):
        raise UsageError("--models and --labels must name each model once")
    return names


def model_stats(scores: torch.Tensor, lengths: torch.Tensor, samples: Samples | None, task_list: list,
                prompts: list, texts: list[str]) -> dict:
    """One model's mean score and length, finished rate (when sampled here), score per task family (on the
    built-in task) and three examples. scores, lengths: (N,) per prompt."""
    stats = {"mean_score": float(scores.mean()), "mean_length": float(lengths.mean())}
    if samples is not None:
        stats["finished_rate"] = float(samples.finished.double().mean())
    if task_list[0] is not None:
        for family in tasks.FAMILIES:
            idx = [i for i, t in enumerate(task_list) if t is not None and t.family == family]
            if idx:
                stats[f"score/{family}"] = float(scores[idx].mean())
    stats["examples"] = [{"prompt": prompts[i][-1]["content"], "response": texts[i], "score": float(scores[i])}
                         for i in range(min(3, len(prompts)))]
    return stats


def write_results(cfg: EvalConfig, result: dict, prompts: list, task_list: list, responses: dict[str, list[str]],
                  scores: dict[str, torch.Tensor]) -> dict:
    """Step 6: eval.json, eval.md, every response with its score, run.json and the Elo plot; the final metrics."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text(markdown(result))
    per_model = result["models"]
    # every response and its score, prompt by prompt, to read what a win rate is made of
    with open(out / "responses.jsonl", "w") as f:
        for i, (messages, task) in enumerate(zip(prompts, task_list)):
            f.write(json.dumps({"messages": messages, "family": task.family if task is not None else None,
                                "responses": {m: responses[m][i] for m in per_model},
                                "scores": {m: float(scores[m][i]) for m in per_model}}) + "\n")
    final = {f"eval/{k}/{m}": v[k] for m, v in per_model.items() for k in ("mean_score", "mean_length")}
    write_run_json(out, cfg, "eval", final)
    if "elo" in result:  # drawn last: the results are written whatever happens to the plot
        plot_elo(result, out / "elo.png")
    return final


def markdown(result: dict) -> str:
    names = list(result["models"])
    what = f"{result['games']} human A/B comparisons" if "games" in result else f"{result['prompts']} prompts"
    lines = [f"# Evaluation: {what}, judge {result['judge']}", "",
             "| model | Elo (95% CI) | mean score | mean length | KL to reference |", "|---|---|---|---|---|"]
    for m in names:
        s = result["models"][m]
        elo = (f"{result['elo'][m]:.0f} ({result['elo_interval'][m][0]:.0f}–{result['elo_interval'][m][1]:.0f})"
               if "elo" in result else "—")
        cells = [f"{s[k]:{f}}" if k in s else "—" for k, f in (("mean_score", ".3f"), ("mean_length", ".1f"),
                                                               ("kl_to_reference", ".2f"))]
        lines.append(f"| {m} | {elo} | " + " | ".join(cells) + " |")
    if "win_rates" in result:  # two matrices of the row model against the column model
        for title, cell in (("Win rate of the row model against the column model (95% Wilson interval):",
                             lambda g: f"{g['win_rate']:.2f} ({g['lo']:.2f}–{g['hi']:.2f})"),
                            ("Games won / lost / tied by the row model against the column model (a tie counts half "
                             "in the win rates above):", lambda g: f"{g['wins']} / {g['losses']} / {g['ties']}")):
            lines += ["", title, "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for a in names:
                cells = [cell(g) if (g := result["win_rates"].get(a, {}).get(b)) else "—" for b in names]
                lines.append(f"| {a} | " + " | ".join(cells) + " |")
    families = [k for k in result["models"][names[0]] if k.startswith("score/")]
    if families:
        lines += ["", "Mean gold score per prompt family (helpful vs harmful):", "",
                  "| model | " + " | ".join(f.split("/")[1] for f in families) + " |",
                  "|---" * (len(families) + 1) + "|"]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(f"{result['models'][m][f]:.3f}" for f in families) + " |")
    return "\n".join(lines) + "\n"


def plot_elo(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["elo"])
    elo = [result["elo"][m] for m in names]
    err = [[e - result["elo_interval"][m][0] for m, e in zip(names, elo)],
           [result["elo_interval"][m][1] - e for m, e in zip(names, elo)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(names)), 3.5))
    ax.bar(range(len(names)), elo, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), [Path(n).name or n for n in names], rotation=20, ha="right")
    ax.axhline(1000, color="grey", lw=0.8)
    ax.set_ylabel("Elo (95% bootstrap interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
