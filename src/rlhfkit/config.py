"""Strict dataclass configs: YAML presets, `--key value` overrides, `--help` from field docstrings.

One dataclass per command. A field's docstring (the string literal right below it, as in cleanRL) is its
`--help` text. Unknown keys are errors that suggest the nearest valid key; values are coerced to the
field's type, and a value that does not fit is an error naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.metadata
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhfkit import UsageError, __version__
from rlhfkit.hf_names import ALIASES, MEANINGS

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it (attribute docstrings). A subclass tells an
    inherited field's meaning for its command in a `RETOLD` dict (field -> docstring) rather than declaring the
    field again, which would silently keep the old default when the base's changes; it declares a field again
    only to give it another default."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update({k: " ".join(v.split()) for k, v in klass.__dict__.get("RETOLD", {}).items()})
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or the command line) to the annotated type `tp`, or raise UsageError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"--{key}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"--{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        inner = args[0] if args else str
        return [_coerce(key, v, inner) for v in items]
    if tp is dict or origin is dict:  # a stage's overrides: a YAML mapping, or `--sft "{lr: 1e-4}"`
        loaded = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(loaded, dict):
            raise UsageError(f"--{key}: expected a mapping such as {{lr: 1e-4}}, got {value!r}")
        return loaded
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"--{key}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise UsageError(f"--{key}: expected int, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"--{key}: expected a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option may take: from `lo` to `hi` (None: unbounded), each end inclusive unless open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below and x == x  # NaN is in no range

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


COUNT, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, lo_open=True)
FRACTION = Range(0, 1)
# Every numeric option of every command, by name (a name means the same thing in every command that has it), so a
# new command inherits the checks; tests/test_config.py fails on a numeric option missing here.
RANGES: dict[str, Range] = {
    **dict.fromkeys(["batch_size", "grad_accum", "epochs", "iterations", "rollout_prompts", "n_samples", "n",
                     "max_new_tokens", "max_length", "minibatch_size", "generate_batch_size", "ptx_batch_size",
                     "rm_batch_size", "ppo_epochs", "lora_r", "lora_alpha", "calibration_bins", "norm_samples",
                     "log_steps", "bootstrap", "kl_horizon", "tiny_hidden_size", "max_body_kb", "bon_n",
                     "suite_size", "rollout_engines",
                     "actor_workers", "critic_workers",
                     "gpus", "actor_gpus", "critic_gpus", "ref_gpus", "reward_gpus", "rollout_gpus", "rollout_tp",
                     "tokens"], COUNT),
    **dict.fromkeys(["save_steps", "eval_steps", "skip_nonfinite", "freeze_layers", "limit", "sample_every",
                     "pmp_epochs", "online_rounds", "save_total_limit", "seed", "lr", "critic_lr", "pmp_lr",
                     "weight_decay", "max_grad_norm", "kl_coef", "entropy_coef", "vf_coef", "ptx_coef", "temperature",
                     "value_clip", "early_stop_kl", "min_score_gap", "min_labels", "rivals", "watch_window",
                     "critic_warmup", "sft_prompts", "rm_prompts", "rl_prompts", "eval_prompts"],
                    NON_NEGATIVE),  # prompts 0: all
    **dict.fromkeys(["beta", "clip_eps", "kl_target", "score_clip", "rollout_correction_cap", "session_hours",
                     "label_poll"], POSITIVE),
    **dict.fromkeys(["warmup_ratio", "min_lr_ratio", "gamma", "lam"], FRACTION),
    "val_fraction": Range(0, 1, hi_open=True), "lora_dropout": Range(0, 1, hi_open=True),
    "label_smoothing": Range(0, 0.5, hi_open=True), "top_p": Range(0, 1, lo_open=True),
    "k": Range(2), "rank_k": Range(2), "port": Range(1, 65535), "gpu_memory_utilization": Range(0, 1, lo_open=True),
    "mfu": Range(0, 1, lo_open=True), "decode_efficiency": Range(0, 1, lo_open=True),
    "max_steps": Range(-1),  # ≤ 0: run `epochs` passes instead
    "missing_eos_penalty": Range(),  # a score: any value
}


def check_range(key: str, value: Any) -> None:
    """A UsageError naming the option when a number lies outside its `RANGES` entry."""
    allowed = RANGES.get(key)
    if allowed is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in allowed:
        raise UsageError(f"--{key.replace('_', '-')} {value!r}: must be {allowed}")


# --- transformers'/TRL's names for our options (`hf_names.ALIASES`) and hints where meanings differ (`MEANINGS`) ---


def dashed(key: str) -> str:
    return "--" + key.replace("_", "-")


def alias_of(cls: type, name: str) -> str | None:
    """Our option that transformers'/TRL's `name` is read as in command `cls`, or None."""
    alias = ALIASES.get(name)
    if alias is None or (alias.only and cls.__name__ not in alias.only):
        return None
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return next((o for o in alias.options if o in fields), None)


def _unknown(key: str, cls: type) -> UsageError:
    """The error for an unknown key: our option nearest in meaning and how it differs, for a transformers/TRL name;
    else the valid key (or the alias of one) it is closest to in spelling (`--lerning-rate` -> `--lr`)."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for field, differs in MEANINGS.get(key, ()):
        if field in valid:
            return UsageError(f"unknown config key {key!r}; {differs}")
    names = {k: k for k in valid}
    names.update({name: ours for name in ALIASES if (ours := alias_of(cls, name))})
    close = [names[c] for c in difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)]
    hint = f"; did you mean {dashed(close[0])}?" if close else ""
    return UsageError(f"unknown config key {key!r}{hint}")


def read_names(cls: type, values: dict[str, Any], where: str, spell) -> dict[str, Any]:
    """`values` (one source: a YAML file, or the command line) under our option names: transformers'/TRL's aliases
    renamed, bf16/fp16 turned into --dtype, and one note on stderr saying what was read as what. `spell(key)` is how
    the source writes a key, for messages. Two names for one option in one source are an error, not a silent
    choice; across sources the command line wins as for any option."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    named: dict[str, str] = {}  # our option -> the name that set it
    read: list[str] = []
    precision: dict[str, bool] = {}  # bf16/fp16 flag -> its value
    for raw, value in values.items():
        key = raw.replace("-", "_")
        ours = key if key in hints else alias_of(cls, key)
        if ours is None:
            raise UsageError(f"{where}{_unknown(key, cls)}")
        if ours != key and ALIASES[key].flag_for:  # both may be given (bf16: true, fp16: false), decided below
            precision[key] = _coerce(key, value, bool)
            continue
        if ours in named:
            raise UsageError(f"{where}{spell(named[ours])} and {spell(key)} both set {dashed(ours)}; give one")
        named[ours] = key
        out[ours] = value
        if ours != key:
            read.append(f"{spell(key)} as {dashed(ours)}")
    if precision:  # transformers: bf16 or fp16 mixed precision over fp32 weights, as our --dtype; neither: fp32
        if "dtype" in named:
            raise UsageError(f"{where}{spell(named['dtype'])} and {spell(next(iter(precision)))} both set --dtype; "
                             "give one")
        chosen = [ALIASES[k].flag_for for k, on in precision.items() if on]
        if len(chosen) > 1:
            raise UsageError(f"{where}{' and '.join(spell(k) for k in precision)} are both true; give one --dtype")
        out["dtype"] = chosen[0] if chosen else "fp32"
        flags = ", ".join(f"{spell(k)} {str(on).lower()}" for k, on in precision.items())
        read.append(f"{flags} as --dtype {out['dtype']}")
    if read and int(os.environ.get("RANK", "0")) == 0:  # launched on several processes, one says it
        print(f"note: {where}read transformers/TRL names as rlhfkit options: {'; '.join(read)}", file=sys.stderr)
    return out


def from_dict(cls: type[C], values: dict[str, Any], source: str = "") -> C:
    """Build `cls` from a flat or nested dict, strictly: unknown keys and ill-typed values are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            err = _unknown(key, cls)
            raise UsageError(f"{source}: {err}" if source else str(err))
        kwargs[key] = _coerce(key, value, hints[key])
        try:
            check_range(key, kwargs[key])
        except UsageError as e:
            raise UsageError(f"{source}: {e}" if source else str(e)) from None
    return cls(**kwargs)


def parse_args(cls: type[C], argv: list[str], prog: str = "rlhfkit") -> C:
    """`--config FILE.yaml` first, then `--key value` / `--key=value` / bare `--flag` overrides. transformers'/TRL's
    names for our options (`ALIASES`) are read as ours, in the file and on the command line."""
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (options look like --key value)")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        ours = "config" if key == "config" else key if key in hints else alias_of(cls, key)
        if ours is None:  # before looking for its value: an unknown last flag is unknown, not one lacking a value
            raise _unknown(key, cls)
        if not eq:
            # a bare flag: a bool option (`bool | None` too: the pipeline's, whose None means the preset's value)
            is_bool = hints.get(ours) in (bool, bool | None) or (ours != key and ALIASES[key].flag_for is not None)
            is_flag = is_bool and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
            is_list = typing.get_origin(hints.get(ours)) is list
            if is_flag:
                val = "true"
            elif is_list and i + 1 < len(argv):  # --models A B C: every value up to the next option
                items = []
                while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    i += 1
                    items.extend(v for v in argv[i].split(",") if v)
                val = items
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise UsageError(f"{dashed(key)} needs a value")
        if key == "config":
            values.update(read_names(cls, _load_yaml(Path(val)), f"{val}: ", str))
        else:
            overrides[key] = val
        i += 1
    values.update(read_names(cls, overrides, "", dashed))
    return from_dict(cls, values)


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UsageError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    return loaded


def help_text(cls: type, prog: str) -> str:
    docs = field_docs(cls)
    lines = [f"usage: {prog} [--config FILE.yaml] [--key value ...]", ""]
    if cls.__doc__:
        lines += [inspect.cleandoc(cls.__doc__), ""]
    # the command's own fields (model, data, output, …) first, then those it shares with other commands
    own = list(vars(cls).get("__annotations__", {}))
    fields = sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own))
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        lines.append(f"  --{f.name.replace('_', '-')}  (default: {default!r})")
        if f.name in docs:
            lines += ["      " + ln for ln in textwrap.wrap(docs[f.name], 90)]
    return "\n".join(lines)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"rlhfkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    for name in ("accelerate", "datasets", "peft"):
        try:  # from the installed metadata: importing datasets (pandas, pyarrow) and peft would cost 0.6 s a run
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_run_json(out_dir: str | os.PathLike, cfg: Any, command: str, final_metrics: dict | None = None,
                   extra: dict | None = None, status: str = "finished") -> Path:
    """run.json: the resolved config, versions, seed, git revision, argv, final metrics and status. Trainers write
    it as "running" when their loop starts, so that a killed run still records what it was, and as "finished"
    after saving the model."""
    path = Path(out_dir) / "run.json"
    record = {
        "command": command,
        "status": status,
        "argv": sys.argv,
        "config": dataclasses.asdict(cfg),
        "seed": getattr(cfg, "seed", None),
        "versions": versions(),
        "git_revision": git_revision(),
        "final_metrics": final_metrics or {},
        **(extra or {}),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path


def run_record_path(output: str | Path) -> Path:
    """samples.jsonl -> samples.run.json, beside the output file."""
    return Path(output).with_suffix(".run.json")


def write_run_record(output: str | Path, cfg: Any, command: str, final: dict, extra: dict | None = None) -> Path:
    """`config.write_run_json`'s record, written beside OUTPUT as OUTPUT.run.json (never over another run.json)."""
    target = run_record_path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        os.replace(write_run_json(tmp, cfg, command, final, extra), target)
    return target
