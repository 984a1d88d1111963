"""The `rlhfkit` command: parse a config, call the algorithm's `train(cfg)`; nothing else.

Errors meant for people (RlhfkitError) print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

from rlhfkit import RlhfkitError
from rlhfkit.config import parse_args


@dataclass
class PreviewConfig:
    """rlhfkit data preview: how each example is rendered and which tokens carry loss."""

    model: str = "smollm2-135m"
    """Model whose tokenizer and chat template render the data."""
    data: str = "sample:conversations"
    """Data file (any supported format) or sample:NAME."""
    format: str | None = None
    """Data format; detected from the columns when not given."""
    columns: list[str] = field(default_factory=list)
    """Rename the file's columns to rlhfkit's, FILE=OURS (`--columns rating=scores answers=responses`), for a layout
    whose columns are named otherwise; keys inside `completions` objects too."""
    view: Literal["auto", "sft", "preference"] = "auto"
    """sft: the conversation SFT trains on; preference: each response after the prompt the comparisons share (the
    trained tokens are the response's), with the pairs; auto: preference for comparison formats, else sft."""
    skip_invalid: bool = False
    """Skip the rows that cannot be converted instead of stopping at the first; they are counted and the first few
    named."""
    min_score_gap: float = 0.0
    """Scored responses: drop a pair whose scores differ by less than this (as rm and dpo do)."""
    max_length: int = 512
    """Truncation length, as in training."""
    limit: int = 3
    """How many examples to show (0: all)."""
    json: bool = False
    """Print one JSON object per sequence: format, tokens, input_ids and loss_mask (and the response and pairs in the
    preference view); with --skip-invalid, a last one with the count and the first errors."""


def preview(cfg: PreviewConfig) -> None:
    from rlhfkit import models
    from rlhfkit.data import chat, formats, io

    tok = models.load_tokenizer(cfg.model)
    rows = formats.rename_columns(io.read_rows(cfg.data), cfg.columns)
    fmt = formats.format_of(rows[0], cfg.format)
    skipped = formats.Skipped() if cfg.skip_invalid else None
    shown: list[tuple[chat.TokenizedExample, dict]] = []  # each sequence, with what the preference view adds
    if cfg.view == "preference" or (cfg.view == "auto" and fmt in formats.COMPARISONS):
        convert = functools.partial(formats.to_preference, min_score_gap=cfg.min_score_gap)
        for pref in formats.convert_rows(rows, convert, fmt, skipped, cfg.data)[0][: cfg.limit or None]:
            names = ["chosen", "rejected"] if len(pref.responses) == 2 else [f"response {i}" for i in
                                                                             range(len(pref.responses))]
            for name, response in zip(names, pref.responses):
                ex = chat.tokenize_response(tok, pref.prompt, response, pref.where, cfg.max_length)
                shown.append((ex, {"response": name, "pairs": pref.pairs}))
    else:
        for conv in formats.convert_rows(rows, formats.to_conversation, fmt, skipped, cfg.data)[0][: cfg.limit or None]:
            ex = chat.tokenize_text(tok, conv.text, conv.where, cfg.max_length) if conv.text is not None \
                else chat.tokenize_conversation(tok, conv.messages, conv.where, cfg.max_length, conv.tools)
            shown.append((ex, {}))
    if not cfg.json:
        print(f"format: {fmt}")
    for ex, extra in shown:
        tokens = tok.convert_ids_to_tokens(ex.input_ids)
        if cfg.json:
            print(json.dumps({"where": ex.where, "format": fmt, **extra, "tokens": tokens, "input_ids": ex.input_ids,
                              "loss_mask": ex.loss_mask, "truncated": ex.truncated}))
            continue
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        text = "".join(_show(tok.decode([i]), m, color) for i, m in zip(ex.input_ids, ex.loss_mask))
        n = sum(ex.loss_mask)
        what = f" {extra['response']}" if extra else ""
        if extra and extra["response"] == "response 0":  # K > 2: which pairs the ranking or scores make
            what += f" (pairs, winner first: {extra['pairs']})"
        print(f"── {ex.where}{what}: {len(ex.input_ids)} tokens, {n} trained"
              f"{' (truncated)' if ex.truncated else ''} ──\n{text}\n")
    if skipped is not None:
        print(json.dumps(skipped.as_dict()) if cfg.json else skipped.line())
    if not cfg.json:
        legend = "green" if sys.stdout.isatty() else "[[ ]]"
        print(f"trained tokens are shown in {legend}")


def _show(piece: str, trained: int, color: bool) -> str:
    if not trained:
        return piece
    return f"\x1b[42;30m{piece}\x1b[0m" if color else f"[[{piece}]]"


def _preview(argv):
    preview(parse_args(PreviewConfig, argv, "rlhfkit data preview"))


# command -> (module under rlhfkit, its config class, the function that runs it, one line of help)
ALGORITHMS = {
    ("sft",): ("algos.sft", "SFTConfig", "train", "supervised fine-tuning; loss on assistant tokens only"),
    ("rm",): ("algos.reward", "RMConfig", "train", "reward model from pairs or K-way rankings"),
    ("score",): ("algos.score", "ScoreConfig", "score", "rewards of prompt/response rows or of comparisons' responses"),
    ("dpo",): ("algos.dpo", "DPOConfig", "train", "direct preference optimisation (sigmoid, IPO, conservative DPO)"),
    ("ppo",): ("algos.ppo", "PPOConfig", "train", "RLHF with PPO (gae, grpo, rloo, reinforce++), PPO-ptx"),
    ("distill-context",): ("algos.distill", "DistillConfig", "train",
                           "context distillation: answer without a long (HHH) prompt as with it"),
    ("generate",): ("algos.generate", "GenerateConfig", "generate", "batched sampling: n responses per prompt"),
    ("best-of-n",): ("algos.best_of_n", "BestOfNConfig", "best_of_n",
                     "rejection sampling: best of n samples by reward; SFT and DPO data out"),
    ("eval",): ("evaluate.evaluation", "EvalConfig", "evaluate",
                "win rates, Elo, mean scores and KL of several models on held-out prompts"),
    ("pipeline",): ("pipeline", "PipelineConfig", "pipeline",
                    "the whole recipe end to end on the built-in task, with a report"),
    ("plan",): ("plan", "PlanConfig", "plan", "what fits on which GPUs, and how long PPO takes, before renting them"),
}
# commands that train, and so take `--accelerate-config NAME|PATH [--num-processes N]` (`distributed.accelerate_launch`)
TRAINERS = {("sft",), ("rm",), ("dpo",), ("ppo",), ("distill-context",)}


def run_algorithm(key: tuple[str, ...], argv: list[str]) -> None:
    """Import the algorithm lazily (so `rlhfkit --help` stays fast), parse its config, run it, print the result."""
    import importlib

    from rlhfkit import distributed

    module_name, config_name, fn_name, _ = ALGORITHMS[key]
    distributed.deepspeed_quietly()  # accelerate, and transformers to save a model, import it where it is installed
    if key in TRAINERS and (launch := distributed.accelerate_launch([*key, *argv])):  # again, on several processes
        raise SystemExit(subprocess.run(launch).returncode)
    module = importlib.import_module(f"rlhfkit.{module_name}")
    cfg = parse_args(getattr(module, config_name), argv, f"rlhfkit {' '.join(key)}")
    result = getattr(module, fn_name)(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # launched on several processes, one prints (torchrun sets RANK)
        print(json.dumps(result, default=float))


def _label(command: str, argv: list[str]) -> None:
    from rlhfkit.label.commands import main as label_main  # the web stack only when asked for

    label_main(command, argv)


COMMANDS = {
    **{key: (functools.partial(run_algorithm, key), doc) for key, (*_, doc) in ALGORITHMS.items()},
    ("data", "preview"): (_preview, "show rendering, tokens and loss masks of a data file"),
    ("label", "serve"): (functools.partial(_label, "serve"), "the human-feedback web app (needs the web extra)"),
    ("label", "users", "add"): (functools.partial(_label, "users add"), "add a labeller and print their token"),
    ("label", "users", "revoke"): (functools.partial(_label, "users revoke"), "cut a labeller off; records kept"),
    ("label", "export"): (functools.partial(_label, "export"), "SFT/pairs/rankings data from collected feedback"),
}


def usage() -> str:
    lines = ["usage: rlhfkit COMMAND [--config FILE.yaml] [--key value ...]", "", "commands:"]
    lines += [f"  {' '.join(k):<14} {doc}" for k, (_, doc) in COMMANDS.items()]
    lines += ["", "`rlhfkit COMMAND --help` lists every option."]
    return "\n".join(lines)


def _close_progress_bars() -> None:
    """Close the bars an error left open, so that `error: …` starts a line of its own, not a bar's line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    for key, (fn, _) in COMMANDS.items():
        if tuple(argv[: len(key)]) == key:
            try:
                fn(argv[len(key):])
            except RlhfkitError as e:
                _close_progress_bars()
                print(f"error: {e}", file=sys.stderr)
                return e.exit_code
            except BrokenPipeError:  # output piped into `head`
                sys.stderr.close()
                return 0
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
            return 0
    print(f"error: unknown command {' '.join(argv[:2])!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
