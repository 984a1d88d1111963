"""`rlhfkit pipeline`: the whole recipe on the built-in task, end to end, with a report.

Papers: Ouyang et al. 2022 (InstructGPT: demonstrations → SFT, K-way rankings → RM, PPO against the RM with a KL
penalty to the SFT model, PPO-ptx); Bai et al. 2022 (HH: best-of-n as the inference-time baseline, reward against
√KL, a second RM on other comparisons as the robustness check, iterated online RLHF); Rafailov et al. 2023 (DPO
on the same comparisons); Gao et al. 2022 (over-optimisation: proxy and gold reward against √KL); Dubois et al.
2023 (AlpacaFarm: simulated labellers in place of people).

Stages, top to bottom; each writes OUTPUT/STAGE/ and a stage.json, and a rerun skips a stage whose stage.json
matches its settings and inputs (and says so):
  1. data         the built-in task's disjoint splits: SFT demonstrations, RM, RL and evaluation prompts
  1b. distill     `--context-distill`: the base model context-distilled from the HHH prompt on the SFT prompts (as
                  Bai et al. 2022 began), the model SFT then starts from
  2. sft          supervised fine-tuning of the base model (or the distilled one) on the demonstrations
  3. comparisons  K responses per RM prompt from the SFT model, each set ranked by one simulated labeller (or by
                  people in the labelling app: --feedback db:FILE)
  4. rm           the reward model on the rankings, initialised from the SFT model; with `robustness`, a second set
                  of comparisons (comparisons_heldout) and a second RM on it (rm_heldout, HH's test PM)
  5. ppo          PPO from the SFT model against the RM (a critic initialised from the RM, GAE); the gold score
                  (and the held-out RM) logged per iteration; `rl_baselines`: the same with critic-free estimators
  6. dpo          DPO from the SFT model on the same rankings
  7. best_of_n    n responses per evaluation prompt from the SFT model; the best by the RM
  8. round1..N    `--online-rounds N`: sample from the latest policy and `rivals` policies before it (taking turns
                  within each ranking), label, retrain the RM on all comparisons so far, run PPO again
  9. eval         base, SFT, best-of-n, DPO and PPO (and every round) on held-out prompts, judged by the gold score
 10. report       report.md and report.html: Elo, win rates, per-family scores, each online round with the labellers'
                  Elo from their rankings, RM calibration, proxy and gold reward against √KL along PPO and along
                  best-of-n, training curves

Departures, and why:
- Labels come from simulated labellers, or with `feedback: db:FILE` from people in the labelling app: every
  comparisons stage (and online round) queues its K responses per prompt there and waits until `min_labels`
  rankings are in (`feedback.rounds`); a run killed while it waits continues with the items it queued. The
  held-out evaluation stays the task's gold score; the labellers' judgement of the models is the report's Elo per
  online round, from rankings that mix the newest policy's responses with earlier ones' (HH deployed several
  models side by side for the same reason), and people's chat A/B choices between the run's models.
- Each online round's PPO starts again from the SFT model (KL to SFT), as the HH paper retrained its policies on
  the newer preference models; the rounds differ in the RM they optimise.
- Presets (rlhfkit/presets/pipeline_NAME.yaml): `default` fits the budget of a 2-core CPU (so fewer prompts and
  iterations than a real run, and the RM, PPO's actor and critic, and DPO train only their upper 22, 15 and 20 of
  SmolLM2's 30 blocks); `tiny` runs everything on tiny-llama in about a minute, for tests.
- HH's robustness check splits the comparisons in half, one RM (the train PM, which RL optimises) on each. Here the
  held-out RM gets a second set of comparisons, drawn and labelled as the first on the same RM prompts (the RM split
  holds hardly more prompts than the default preset asks for), so the two share prompts but no response or label,
  and the RM PPO optimises keeps every comparison it would have without the check. With people's labels that is
  a second batch to rank. The default preset trains the held-out RM more cheaply than the first (`rm_heldout`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from rlhfkit import UsageError, models
from rlhfkit.config import from_dict, write_run_json
from rlhfkit.sim import labellers, tasks
from rlhfkit.tracking import claim_output, machine_speed, release_output

PRESETS = Path(__file__).parent / "presets"  # pipeline_NAME.yaml, shipped with the package


HELD_OUT_SEED = 1 << 20  # added to the seed of the held-out RM's comparisons: far from online round r's seed + r
CRITIC_FREE = ("rloo", "grpo", "reinforce++")  # `ppo --advantage` estimators without a critic: --rl-baselines


def preset(name: str) -> dict[str, Any]:
    """The values of `--preset NAME` (rlhfkit/presets/pipeline_NAME.yaml)."""
    names = sorted(p.stem.removeprefix("pipeline_") for p in PRESETS.glob("pipeline_*.yaml"))
    if name not in names:
        raise UsageError(f"--preset {name!r}: expected one of {', '.join(names)}")
    return yaml.safe_load((PRESETS / f"pipeline_{name}.yaml").read_text())


@dataclass
class PipelineConfig:
    """rlhfkit pipeline: SFT → comparisons → RM → PPO, DPO and best-of-n → evaluation and report, on the built-in
    task. Options left unset take the preset's value."""

    preset: str = "default"
    """default (smollm2-135m: about 39 minutes on 2 AVX2-only cores, 22 with native bf16) or tiny (tiny-llama,
    about a minute)."""
    output: str = "runs/pipeline"
    """Output directory: one subdirectory per stage, report.md, report.html, run.json."""
    online_rounds: int = 0
    """Iterated online RLHF: rounds of sampling from the latest policy, labelling, retraining the RM, PPO again."""
    feedback: str = "sim"
    """Who ranks the comparisons: sim (simulated labellers), or db:FILE, people in `rlhfkit label serve --db FILE`:
    each comparisons stage (and online round) queues its responses there and waits for --min-labels rankings."""
    min_labels: int = 0
    """With --feedback db: rankings to wait for in each comparisons stage (0: one per queued prompt)."""
    label_poll: float = 5.0
    """With --feedback db: seconds between looks at the database while waiting for rankings."""
    use_thumbs: bool = False
    """With --feedback db: people's A/B choices in the app's chat, and thumbs (an answer rated up over one to the
    same conversation rated down), join the rankings of every RM (the held-out one excepted) as pairs."""
    seed: int = 0
    """Seed of the task suite, the labellers and every stage."""
    model: str | None = None
    """Base model (preset: smollm2-135m; tiny: tiny-llama)."""
    suite_size: int | None = None
    """Prompts in the built-in task suite before splitting into SFT/RM/RL/eval."""
    sft_prompts: int | None = None
    """SFT demonstrations to use, the families taken in turn (0: the whole SFT split)."""
    rm_prompts: int | None = None
    """RM prompts to collect comparisons on, the families taken in turn (0: the whole RM split)."""
    rl_prompts: int | None = None
    """PPO prompts, the families taken in turn (0: the whole RL split)."""
    eval_prompts: int | None = None
    """Held-out evaluation prompts (0: the whole evaluation split)."""
    k: int | None = None
    """Responses ranked per RM prompt (InstructGPT: 4 to 9)."""
    bon_n: int | None = None
    """n of the best-of-n baseline."""
    robustness: bool | None = None
    """HH's robustness check: a second RM (rm_heldout, the test PM) on a second set of comparisons drawn like the
    first; PPO optimises the RM of the first set and is scored by the second every iteration."""
    rivals: int | None = None
    """Online rounds: how many earlier models (the previous round's policy, then older ones down to SFT) write
    responses beside the newest policy's in each ranking, the models taking turns; every ranking is then also a vote
    between models, the labellers' Elo of each round in the report. 0: the newest policy alone."""
    ptx: bool | None = None
    """PPO-ptx: mix the SFT demonstrations' log-likelihood into PPO's updates."""
    context_distill: bool | None = None
    """First distil the HHH context into the base model on the SFT prompts (`rlhfkit distill-context`, as Anthropic's
    HH assistant began); SFT then starts from the distilled model."""
    temperature: float | None = None
    """Sampling temperature of the evaluation and of best-of-n."""
    system_prompt: str | None = None
    """A system turn before every prompt (none: the chat template's own default; SmolLM2's is 20 tokens long,
    a third of a typical sequence here)."""
    rl_baselines: list[str] = field(default_factory=list)
    """Critic-free estimators to run beside PPO, as report rows: rloo, grpo and/or reinforce++, each a PPO stage
    (ppo_NAME) from the same SFT model against the same RM with the same settings but --advantage."""
    skip: list[str] = field(default_factory=list)
    """Stages to leave out: dpo, best_of_n, ppo (the rest are needed by later stages)."""
    sft: dict = field(default_factory=dict)
    """Overrides of `rlhfkit sft` options, e.g. {lr: 5e-5, epochs: 2}."""
    distill: dict = field(default_factory=dict)
    """Overrides of `rlhfkit distill-context` options (with --context-distill)."""
    rm: dict = field(default_factory=dict)
    """Overrides of `rlhfkit rm` options."""
    rm_heldout: dict = field(default_factory=dict)
    """With robustness: overrides of `rlhfkit rm` options for the held-out RM, over `rm`'s."""
    ppo: dict = field(default_factory=dict)
    """Overrides of `rlhfkit ppo` options."""
    dpo: dict = field(default_factory=dict)
    """Overrides of `rlhfkit dpo` options."""
    sample: dict = field(default_factory=dict)
    """Sampling of the comparisons: max_new_tokens, temperature, top_p, batch_size, dtype."""
    eval: dict = field(default_factory=dict)
    """Overrides of `rlhfkit eval` options."""


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """The preset's values under the user's: unset top-level options from the preset, stage dicts merged."""
    defaults = preset(cfg.preset)
    bad = [s for s in cfg.skip if s not in ("dpo", "best_of_n", "ppo")]
    if bad:
        raise UsageError(f"--skip {bad[0]!r}: only dpo, best_of_n and ppo can be skipped")
    bad = [a for a in cfg.rl_baselines if a not in CRITIC_FREE]
    if bad:
        raise UsageError(f"--rl-baselines {bad[0]!r}: expected {', '.join(CRITIC_FREE)} "
                         "(PPO itself is the ppo stage)")
    if cfg.rl_baselines and "ppo" in cfg.skip:
        raise UsageError("--rl-baselines run beside the ppo stage: drop --skip ppo")
    if cfg.feedback != "sim" and not cfg.feedback.startswith("db:"):
        raise UsageError(f"--feedback {cfg.feedback!r}: expected sim (simulated labellers) or db:FILE (people in "
                         "`rlhfkit label serve --db FILE`)")
    if cfg.feedback.startswith("db:") and "://" not in cfg.feedback and not Path(cfg.feedback[3:]).is_file():
        raise UsageError(f"--feedback {cfg.feedback}: no such database; make it, and the labellers' accounts, with "
                         "`rlhfkit label users add --db FILE --name NAME`, and serve it with `rlhfkit label serve`")
    if cfg.use_thumbs and cfg.feedback == "sim":
        raise UsageError("--use-thumbs takes people's thumbs and A/B choices from the labelling app: it needs "
                         "--feedback db:FILE")
    values = {}
    for f in fields(cfg):
        mine, theirs = getattr(cfg, f.name), defaults.get(f.name)
        if isinstance(theirs, dict):
            values[f.name] = {**theirs, **mine}
        elif mine is None:
            values[f.name] = theirs
    resolved = replace(cfg, **values)
    check_stage_options(resolved)
    return resolved


def check_stage_options(cfg: PipelineConfig) -> None:
    """A typo in a stage's overrides fails before any stage runs, naming the stage and the key."""
    from rlhfkit.algos.distill import DistillConfig
    from rlhfkit.algos.dpo import DPOConfig
    from rlhfkit.rollout.sampling import SamplingConfig
    from rlhfkit.algos.ppo import PPOConfig
    from rlhfkit.algos.reward import RMConfig
    from rlhfkit.algos.sft import SFTConfig
    from rlhfkit.evaluate.evaluation import EvalConfig

    for name, cls in (("sft", SFTConfig), ("distill", DistillConfig), ("rm", RMConfig), ("ppo", PPOConfig),
                      ("dpo", DPOConfig), ("sample", SamplingConfig), ("eval", EvalConfig)):
        from_dict(cls, getattr(cfg, name), f"pipeline.{name}")
    from_dict(RMConfig, rm_options(cfg, held_out=True), "pipeline.rm_heldout")


def rm_options(cfg: PipelineConfig, held_out: bool = False) -> dict:
    """The `rlhfkit rm` options of the pipeline's RM, or of the held-out one (`rm_heldout`'s over `rm`'s)."""
    return {**cfg.rm, **cfg.rm_heldout} if held_out else cfg.rm


# --- stages: each returns a summary dict; `Run.stage` skips what is already complete ----------------------------


@dataclass
class Run:
    cfg: PipelineConfig
    out: Path
    keys: dict[str, str] = field(default_factory=dict)  # stage -> key of its settings and inputs
    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, settings: dict, inputs: list[str], fn: Callable[[Path], dict],
              resumable: bool = False) -> dict:
        """Run `fn(dir)` unless DIR/stage.json records the same settings and inputs; a changed stage reruns from
        scratch (its directory is removed first, so no stale checkpoint is resumed). A `resumable` stage that was
        interrupted with the same settings and inputs (.DIR.started beside it) keeps its directory: `fn` takes up
        where it stopped (people's rankings: the items it queued)."""
        d = self.out / name
        key = hashlib.sha1(json.dumps([settings, [self.keys[i] for i in inputs]], sort_keys=True,
                                      default=str).encode()).hexdigest()[:16]
        self.keys[name] = key
        marker = d / "stage.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("key") == key:
                print(f"[pipeline] {name}: complete in {d}, skipped")
                self.summaries[name], self.seconds[name] = done["summary"], done["seconds"]
                return done["summary"]
        started = d.with_name(f".{d.name}.started")  # beside DIR: a trainer wants its directory to itself
        if resumable and started.is_file() and started.read_text() == key and d.is_dir():
            print(f"[pipeline] {name}: interrupted earlier, continuing in {d}")
        else:
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            if resumable:
                started.write_text(key)
            print(f"[pipeline] {name}: running → {d}")
        start = time.perf_counter()
        summary = fn(d)
        self.seconds[name] = time.perf_counter() - start
        self.summaries[name] = summary
        marker.write_text(json.dumps({"key": key, "summary": summary, "seconds": self.seconds[name]}, indent=2,
                                     default=float))
        return summary


def run_trainer(train, config_class, values: dict, section: str, keep: tuple[str, ...]) -> dict:
    """One trainer's run as a stage: configured from `values` (a bad key is an error naming `section`), after
    accelerate's global state is reset (stages share one process, and a second Accelerator must not inherit the
    first's); the final metrics whose names start with `keep`, for the stage's summary."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    final = train(from_dict(config_class, values, section))
    return {k: v for k, v in final.items() if k.startswith(keep)}


def write_rows(path: Path, rows: list[dict]) -> None:
    from rlhfkit.data.io import write_jsonl

    write_jsonl(path, rows)


def cfg_out(cfg: PipelineConfig) -> Path:
    return Path(cfg.output)


def limited(items: list, n: int) -> list:
    return items[:n] if n else items


def interleaved(split: list[tasks.Task]) -> list[tasks.Task]:
    """The split's tasks taking the families in turn, so a limit keeps them balanced (most prompts of the suite
    are of the length family, which has the most distinct prompts)."""
    by_family = [[t for t in split if t.family == f] for f in tasks.FAMILIES]
    return [group[i] for i in range(max(map(len, by_family))) for group in by_family if i < len(group)]


def stage_data(cfg: PipelineConfig, d: Path) -> dict:
    """Splits of the suite as files: demonstrations (SFT data) and prompt rows that carry the gold task."""
    rng = random.Random(cfg.seed)
    suite = tasks.build_suite(cfg.suite_size, cfg.seed)
    split = {name: [t for t in suite if tasks.split_of(t) == name] for name in tasks.SPLITS}
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    sft = limited(interleaved(split["sft"]), cfg.sft_prompts)
    write_rows(d / "sft.jsonl", [{"messages": system + [{"role": "user", "content": t.prompt},
                                                        {"role": "assistant", "content": tasks.demonstration(t, rng)}]}
                                 for t in sft])
    counts = {"sft": len(sft)}
    for name, n in (("rm", cfg.rm_prompts), ("rl", cfg.rl_prompts), ("eval", cfg.eval_prompts)):
        # RM and RL prompts take the families in turn, so a limit keeps them balanced; the whole RL split (the
        # preset's) is three quarters length prompts, and giving each family a fifth of PPO's prompts by repeating
        # the others' did not change its held-out win rate (RESULTS.md, "PPO's prompts by family"). Evaluation keeps
        # the suite's own mix
        rows = [{**tasks.to_row(t), "prompt": system + [{"role": "user", "content": t.prompt}]}
                for t in limited(split[name] if name == "eval" else interleaved(split[name]), n)]
        write_rows(d / f"{name}_prompts.jsonl", rows)
        counts[name] = len(rows)
    return {"prompts": counts}


Policy = tuple[str, str]  # (model directory, its name in the report: sft, ppo, ppo-round1, ...)


def slots(k: int, m: int, rng: random.Random) -> list[int]:
    """Which of m models writes each of a prompt's k responses: the models in turn from a random one, shuffled, so
    each writes k/m of them (one more for some when m does not divide k) and no position belongs to a model."""
    start = rng.randrange(m)
    who = [(start + j) % m for j in range(k)]
    rng.shuffle(who)
    return who


def sample_k(cfg: PipelineConfig, policies: list[Policy], seed: int) -> tuple[list[dict], dict]:
    """K responses per RM prompt, the `policies` taking turns (`slots`): rows of prompt, responses, the name of the
    model that wrote each, the task (family, params) and each response's gold score; and the sampling settings of
    the first policy (the newest), with the speed over all."""
    from rlhfkit.rollout.sampling import SamplingConfig, generation_settings, sample

    m = len(policies)
    sampling = from_dict(SamplingConfig, {**cfg.sample, "prompts": str(cfg_out(cfg) / "data" / "rm_prompts.jsonl"),
                                          "n": -(-cfg.k // m), "seed": seed}, "pipeline.sample")
    drawn, tokens_per_s = [], []
    for path, _ in policies:  # each samples the most responses one prompt can need from it; extras go unused
        prompts, columns, samples, metrics = sample(sampling, path)
        drawn.append(samples.texts)
        tokens_per_s.append(metrics["perf/tokens_per_s"])
    rows, rng = [], random.Random(seed)
    for i, (prompt, row) in enumerate(zip(prompts, columns)):
        task, used = tasks.from_row(row), [0] * m
        texts, names = [], []
        for w in slots(cfg.k, m, rng):
            texts.append(drawn[w][i * sampling.n + used[w]])
            names.append(policies[w][1])
            used[w] += 1
        rows.append({"prompt": prompt.messages, "responses": texts, "models": names, "family": task.family,
                     "params": task.params, "gold": [tasks.gold_score(task, t) for t in texts]})
    settings = {k: v for k, v in generation_settings(sampling, policies[0][0]).items() if k != "model"}
    return rows, {**settings, "n": cfg.k, "tokens_per_s": sum(tokens_per_s) / m}


def people_rank(cfg: PipelineConfig, policies: list[Policy], d: Path, seed: int) -> tuple[list[dict], dict]:
    """The sampled rows queued in the labelling app (once: DIR/queued.json records them, so a rerun after a kill
    waits for the same items) and, once --min-labels rankings are in, one row per ranking, with who gave it."""
    from rlhfkit.feedback import rounds

    db, record = cfg.feedback.removeprefix("db:"), d / "queued.json"
    if record.is_file():
        queued = json.loads(record.read_text())
    else:
        rows, settings = sample_k(cfg, policies, seed)
        source = {name: (path, model_revision(path)) for path, name in policies}
        items = rounds.queue(db, rows, [[source[name] for name in row["models"]] for row in rows], settings, str(d),
                             cfg.min_labels or len(rows))
        queued = {"items": items, "rows": rows, "settings": settings}
        record.with_suffix(".tmp").write_text(json.dumps(queued))
        record.with_suffix(".tmp").rename(record)
    wanted = cfg.min_labels or len(queued["items"])
    print(f"[pipeline] {d.name}: {len(queued['items'])} prompts with {cfg.k} responses each are in the ranking queue "
          f"of {db}; waiting for {wanted} rankings", file=sys.stderr)
    got = rounds.wait(db, queued["items"], wanted, cfg.label_poll, d.name)
    rows = [{**queued["rows"][r.item], "ranking": r.ranking, "labeller": r.labeller} for r in got]
    return rows, queued["settings"]


def model_revision(path: str) -> str:
    """What the labelling app records as a response's model revision: the start of the weights' SHA-256."""
    digest = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def label(cfg: PipelineConfig, policies: list[Policy], d: Path, seed: int) -> dict:
    """K responses per RM prompt from `policies` (the newest first) taking turns, ranked by simulated labellers or,
    with `feedback: db:FILE`, by people in the labelling app, as SPEC rankings rows (with the models that wrote the
    responses and the gold scores, which only the report reads)."""
    if cfg.feedback == "sim":
        rows, settings = sample_k(cfg, policies, seed)
        pool, rng = labellers.default_pool(), random.Random(seed)
        for i, row in enumerate(rows):
            who = pool[i % len(pool)]
            row.update(ranking=who.rank(tasks.from_row(row), row["responses"], rng), labeller=who.id)
    else:
        rows, settings = people_rank(cfg, policies, d, seed)
    write_rows(d / "rankings.jsonl", rows)
    prompt_of = dict.fromkeys(json.dumps(r["prompt"]) for r in rows)  # people may rank one prompt's responses twice
    tied = sum(any(isinstance(g, list) for g in r["ranking"]) for r in rows)
    return {"rankings": len(rows), "rankings_with_ties": tied, "labellers": len({r["labeller"] for r in rows}),
            "samples": cfg.k * len(prompt_of),
            "mean_gold": sum(sum(r["gold"]) for r in rows) / max(1, sum(len(r["gold"]) for r in rows)),
            "generate_tokens_per_s": settings["tokens_per_s"]}


def people_data(cfg: PipelineConfig, rankings: str, d: Path, thumbs: bool, val_fraction: float) -> dict:
    """The data options of an RM trained on people's labels into `d`, as files beside `d` (a trainer wants its
    directory to itself): the rankings, with `thumbs` also people's A/B choices and thumbs pairs as they are in the
    database now (K = 2 rankings); validation is whole labellers, as InstructGPT held out labellers
    (`export.split_groups`; with a single labeller the RM's own split of rows)."""
    from rlhfkit.feedback import rounds
    from rlhfkit.feedback.export import split_groups

    rows = [json.loads(line) for line in Path(rankings).read_text().splitlines()]
    if thumbs:
        pairs = rounds.pairs(cfg.feedback.removeprefix("db:"))
        rows += pairs
        print(f"[pipeline] {d.name}: {len(pairs)} pairs from people's A/B choices and thumbs join the rankings",
              file=sys.stderr)
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["labeller"]] = sizes.get(r["labeller"], 0) + 1
    held = split_groups(sizes, val_fraction, cfg.seed)
    train, val = d.with_name(f"{d.name}_train.jsonl"), d.with_name(f"{d.name}_val.jsonl")
    write_rows(train, [r for r in rows if r["labeller"] not in held])
    if not held:
        return {"data": str(train)}
    write_rows(val, [r for r in rows if r["labeller"] in held])
    print(f"[pipeline] {d.name}: validation on the labels of {', '.join(sorted(held))}", file=sys.stderr)
    return {"data": str(train), "val_data": str(val)}


def train_rm(cfg: PipelineConfig, sft_dir: str, data: str, d: Path, held_out: bool = False) -> dict:
    """An RM from the SFT model on the rankings file `data` (with people's labels: `people_data`); the `held_out`
    one with `rm_heldout`'s options and without people's thumbs, which the first RM trains on."""
    from rlhfkit.algos import reward

    options = dict(rm_options(cfg, held_out))
    if cfg.feedback == "sim":
        options["data"] = data
    else:
        thumbs = cfg.use_thumbs and not held_out
        options |= people_data(cfg, data, d, thumbs, options.get("val_fraction", reward.RMConfig.val_fraction))
    values = {"seed": cfg.seed, **options, "model": sft_dir, "output": str(d)}
    return run_trainer(reward.train, reward.RMConfig, values, "pipeline.rm_heldout" if held_out else "pipeline.rm",
                       ("rm/", "val/", "train/loss"))


def train_ppo(cfg: PipelineConfig, sft_dir: str, rm_dir: str, monitor_rm: str | None, d: Path) -> dict:
    from rlhfkit.algos import ppo

    monitor = ["rlhfkit.sim.tasks:gold_reward"] + ([f"rm:{monitor_rm}"] if monitor_rm else [])
    extra = {"ptx_data": str(cfg_out(cfg) / "data" / "sft.jsonl")} if cfg.ptx else {}
    values = {"seed": cfg.seed, **extra, **cfg.ppo, "policy": sft_dir, "reward_model": rm_dir, "monitor": monitor,
              "prompts": str(cfg_out(cfg) / "data" / "rl_prompts.jsonl"), "output": str(d)}
    return run_trainer(ppo.train, ppo.PPOConfig, values, "pipeline.ppo",
                       ("ppo/score", "ppo/kl", "ppo/sqrt_kl", "monitor/", "rollout/", "ppo/ptx"))


def stage_best_of_n(cfg: PipelineConfig, sft_dir: str, rm_dir: str, d: Path) -> dict:
    from rlhfkit.algos.best_of_n import BestOfNConfig, best_of_n

    ev = cfg.eval
    bon = from_dict(BestOfNConfig, {"policy": sft_dir, "reward_model": rm_dir, "n": cfg.bon_n,
                                    "prompts": str(cfg_out(cfg) / "data" / "eval_prompts.jsonl"),
                                    "output": str(d / "best.jsonl"), "samples_output": str(d / "samples.jsonl"),
                                    "temperature": cfg.temperature, "seed": cfg.seed,
                                    **{k: ev[k] for k in ("max_new_tokens", "batch_size", "dtype") if k in ev}},
                    "pipeline.best_of_n")
    final = best_of_n(bon)
    return {k: v for k, v in final.items() if k.startswith("bon/")}


def train_distill(cfg: PipelineConfig, d: Path) -> dict:
    from rlhfkit.algos import distill

    values = {"seed": cfg.seed, **cfg.distill, "model": cfg.model, "prompts": str(cfg_out(cfg) / "data" / "sft.jsonl"),
              "output": str(d)}
    return run_trainer(distill.train, distill.DistillConfig, values, "pipeline.distill", ("val/kl", "train/steps"))


def train_sft(cfg: PipelineConfig, start: str, d: Path) -> dict:
    from rlhfkit.algos import sft

    values = {"seed": cfg.seed, **cfg.sft, "model": start, "data": str(cfg_out(cfg) / "data" / "sft.jsonl"),
              "output": str(d)}
    return run_trainer(sft.train, sft.SFTConfig, values, "pipeline.sft", ("train/loss", "val/", "train/steps"))


def train_dpo(cfg: PipelineConfig, sft_dir: str, data: str, d: Path) -> dict:
    from rlhfkit.algos import dpo

    values = {"seed": cfg.seed, **cfg.dpo, "model": sft_dir, "data": data, "output": str(d)}
    return run_trainer(dpo.train, dpo.DPOConfig, values, "pipeline.dpo", ("dpo/", "train/loss", "train/accuracy"))


def online_rounds(cfg: PipelineConfig, run: Run, sft_dir: str, held_out: str | None,
                  entries: list[tuple[str, str]]) -> None:
    """Step 8: each round, fresh comparisons from the latest policy and its `rivals` predecessors taking turns (so
    every ranking is also a vote between models: the report's labellers' Elo), the RM retrained on all so far, PPO
    again; each round's policy joins `entries`."""
    out = cfg_out(cfg)
    policies: list[Policy] = [(sft_dir, "sft"), (str(out / "ppo"), "ppo")]  # oldest first
    all_rankings = [out / "comparisons" / "rankings.jsonl"]
    for r in range(1, cfg.online_rounds + 1):
        if "ppo" in cfg.skip:
            raise UsageError("--online-rounds needs the ppo stage")
        rd = f"round{r}"
        shown = policies[::-1][:1 + cfg.rivals]  # the newest, then the ones before it
        run.stage(f"{rd}/comparisons", {"k": cfg.k, "sample": cfg.sample, "round": r, "feedback": cfg.feedback,
                                        "models": [name for _, name in shown]},
                  ["ppo" if r == 1 else f"round{r - 1}/ppo"], lambda d, p=shown, r=r: label(cfg, p, d, cfg.seed + r),
                  resumable=cfg.feedback != "sim")
        all_rankings.append(out / rd / "comparisons" / "rankings.jsonl")
        merged = out / rd / "all_rankings.jsonl"
        merged.write_text("".join(p.read_text() for p in all_rankings))
        run.stage(f"{rd}/rm", {"rm": cfg.rm, "thumbs": cfg.use_thumbs}, [f"{rd}/comparisons"],
                  lambda d, m=merged: train_rm(cfg, sft_dir, str(m), d))
        run.stage(f"{rd}/ppo", {"ppo": cfg.ppo, "ptx": cfg.ptx}, [f"{rd}/rm"],
                  lambda d, rd=rd: train_ppo(cfg, sft_dir, str(out / rd / "rm"), held_out, d))
        policies.append((str(out / rd / "ppo"), f"ppo-{rd}"))
        entries.append(policies[-1])


def stage_eval(cfg: PipelineConfig, entries: list[tuple[str, str]], sft_dir: str, d: Path) -> dict:
    from rlhfkit.evaluate.evaluation import EvalConfig, evaluate

    ev = from_dict(EvalConfig, {"temperature": cfg.temperature, "seed": cfg.seed, **cfg.eval,
                                "models": [m for m, _ in entries], "labels": [n for _, n in entries],
                                "prompts": str(cfg_out(cfg) / "data" / "eval_prompts.jsonl"), "judge": "sim",
                                "reference": sft_dir, "output": str(d)}, "pipeline.eval")
    evaluate(ev)
    return json.loads((d / "eval.json").read_text())["elo"]


def pipeline(cfg: PipelineConfig) -> dict:
    from rlhfkit.evaluate import report

    cfg = resolve(cfg)
    # a rerun continues: complete stages are skipped (`Run.stage`), so an earlier run's files are expected here
    out = claim_output(cfg.output, resume=False, overwrite=False, keep_contents=True)
    run = Run(cfg, out)
    start = time.perf_counter()
    # one measure of this machine's speed now and at the end (2–3 s in all): a shared VM's speed moves by more than
    # a stage's optimisations
    native = "bf16" if models.mixed_precision("auto") == "bf16" else "fp32"  # what --dtype auto computes in
    speed = {"matmul_dtype": native, "matmul_gflops_start": machine_speed(native)}
    common = {"model": cfg.model, "seed": cfg.seed}
    # 1. data
    run.stage("data", {**common, "suite": cfg.suite_size, "system": cfg.system_prompt,
                       "limits": [cfg.sft_prompts, cfg.rm_prompts, cfg.rl_prompts, cfg.eval_prompts]}, [],
              lambda d: stage_data(cfg, d))
    # 1b. context distillation, 2. SFT (from the distilled model, where there is one)
    start_model = cfg.model
    if cfg.context_distill:
        run.stage("distill", {**common, "distill": cfg.distill}, ["data"], lambda d: train_distill(cfg, d))
        start_model = str(out / "distill")
    sft_dir = str(out / "sft")
    run.stage("sft", {**common, "sft": cfg.sft}, ["distill" if cfg.context_distill else "data"],
              lambda d: train_sft(cfg, start_model, d))
    # 3. comparisons from the SFT model
    people = cfg.feedback != "sim"  # an interrupted wait for people's rankings continues with the items it queued
    drawn = {"k": cfg.k, "sample": cfg.sample, "seed": cfg.seed, "feedback": cfg.feedback}
    run.stage("comparisons", drawn, ["sft"], lambda d: label(cfg, [(sft_dir, "sft")], d, cfg.seed), resumable=people)
    # 4. reward model(s)
    comparisons = out / "comparisons"
    run.stage("rm", {"rm": cfg.rm, "thumbs": cfg.use_thumbs}, ["comparisons"],
              lambda d: train_rm(cfg, sft_dir, str(comparisons / "rankings.jsonl"), d))
    rm_dir, held_out = str(out / "rm"), None
    if cfg.robustness:
        # HH's test PM, on comparisons of its own: see the departures above
        run.stage("comparisons_heldout", drawn, ["sft"],
                  lambda d: label(cfg, [(sft_dir, "sft")], d, cfg.seed + HELD_OUT_SEED), resumable=people)
        run.stage("rm_heldout", {"rm": rm_options(cfg, held_out=True)}, ["comparisons_heldout"],
                  lambda d: train_rm(cfg, sft_dir, str(out / "comparisons_heldout" / "rankings.jsonl"), d,
                                     held_out=True))
        held_out = str(out / "rm_heldout")
    # 5. PPO, 6. DPO, 7. best-of-n
    entries = [(cfg.model, "base"), (sft_dir, "sft")]
    if "best_of_n" not in cfg.skip:
        run.stage("best_of_n", {"n": cfg.bon_n, "t": cfg.temperature, "eval": cfg.eval}, ["rm"],
                  lambda d: stage_best_of_n(cfg, sft_dir, rm_dir, d))
        entries.append((f"responses:{out / 'best_of_n' / 'best.jsonl'}", f"best-of-{cfg.bon_n}"))
    if "dpo" not in cfg.skip:
        run.stage("dpo", {"dpo": cfg.dpo}, ["comparisons"],
                  lambda d: train_dpo(cfg, sft_dir, str(comparisons / "rankings.jsonl"), d))
        entries.append((str(out / "dpo"), "dpo"))
    if "ppo" not in cfg.skip:
        run.stage("ppo", {"ppo": cfg.ppo, "ptx": cfg.ptx}, ["rm"] + (["rm_heldout"] if held_out else []),
                  lambda d: train_ppo(cfg, sft_dir, rm_dir, held_out, d))
        entries.append((str(out / "ppo"), "ppo"))
        for est in cfg.rl_baselines:  # the same PPO stage with a critic-free estimator, as a report row
            variant = replace(cfg, ppo={**cfg.ppo, "advantage": est})
            run.stage(f"ppo_{est}", {"ppo": variant.ppo, "ptx": cfg.ptx},
                      ["rm"] + (["rm_heldout"] if held_out else []),
                      lambda d, v=variant: train_ppo(v, sft_dir, rm_dir, held_out, d))
            entries.append((str(out / f"ppo_{est}"), f"ppo-{est}"))
    # 8. online rounds
    online_rounds(cfg, run, sft_dir, held_out, entries)
    # 9. evaluation on held-out prompts, judged by the gold score
    run.stage("eval", {"eval": cfg.eval, "t": cfg.temperature, "entries": entries},
              [k for k in run.keys if k != "data"], lambda d: stage_eval(cfg, entries, sft_dir, d))
    # 10. report
    speed["matmul_gflops_end"] = machine_speed(native)
    paths = report.write(out, cfg, run.summaries, run.seconds, speed)
    total = time.perf_counter() - start
    final = {"pipeline/seconds": total, **{f"elo/{k}": v for k, v in run.summaries["eval"].items()}}
    write_run_json(out, cfg, "pipeline", final, {"stages": run.seconds, "summaries": run.summaries,
                                                 "preset": cfg.preset, "config": asdict(cfg),
                                                 "machine_speed": speed})
    release_output(out)
    print(f"[pipeline] done in {total / 60:.1f} min: {paths['md']} and {paths['html']}")
    return final
