"""Strict configs: YAML + overrides, unknown keys suggest the nearest valid key, values are type-checked."""

from __future__ import annotations

import dataclasses

import pytest

from rlhfkit import UsageError
from rlhfkit.algos.sft import SFTConfig
from rlhfkit.config import field_docs, parse_args
from tests.conftest import REPO


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.001\nepochs: 3\nlora_targets: [q_proj]\n")
    cfg = parse_args(SFTConfig, ["--config", str(p), "--epochs", "5", "--packing", "--max-length=64"])
    assert cfg.lr == 0.001 and cfg.epochs == 5 and cfg.packing is True and cfg.max_length == 64
    assert cfg.lora_targets == ["q_proj"]


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(UsageError, match=r"^unknown config key 'lerning_rate'; did you mean --lr\?$"):
        parse_args(SFTConfig, ["--lerning-rate", "1"])  # transformers' name, misspelt
    with pytest.raises(UsageError, match=r"^unknown config key 'gradient_checkpointin'; did you mean "
                                         r"--gradient-checkpointing\?$"):
        parse_args(SFTConfig, ["--gradient-checkpointin"])
    with pytest.raises(UsageError, match=r"did you mean --batch-size\?"):
        parse_args(SFTConfig, ["--batch-sise", "2"])
    p = tmp_path / "c.yaml"
    p.write_text("epoch: 3\n")
    with pytest.raises(UsageError, match=r"c\.yaml: unknown config key 'epoch'; did you mean --epochs\?"):
        parse_args(SFTConfig, ["--config", str(p)])


def test_transformers_and_trl_names_are_read_as_ours_and_said_once(tmp_path, capsys):
    from rlhfkit.algos.dpo import DPOConfig
    from rlhfkit.algos.ppo import PPOConfig

    p = tmp_path / "trl.yaml"  # the shape of TRL's example configs
    p.write_text("model_name_or_path: tiny-llama\nlearning_rate: 2.0e-4\nnum_train_epochs: 3\npacking: true\n"
                 "per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\ngradient-checkpointing: true\n"
                 "logging_steps: 5\nuse_peft: true\nlora_r: 8\nbf16: true\nfp16: false\noutput_dir: out\n")
    cfg = parse_args(SFTConfig, ["--config", str(p), "--learning_rate", "1e-4", "--max-seq-length", "128"])
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.log_steps, cfg.lora, cfg.dtype,
            cfg.output, cfg.max_length) == ("tiny-llama", 1e-4, 3, 2, 8, 5, True, "bf16", "out", 128)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {p}: read transformers/TRL names as rlhfkit options: model_name_or_path as --model; "
                   "learning_rate as --lr; num_train_epochs as --epochs; per_device_train_batch_size as --batch-size; "
                   "gradient_accumulation_steps as --grad-accum; logging_steps as --log-steps; use_peft as --lora; "
                   "output_dir as --output; bf16 true, fp16 false as --dtype bf16",
                   "note: read transformers/TRL names as rlhfkit options: --learning-rate as --lr; --max-seq-length "
                   "as --max-length"]
    assert parse_args(PPOConfig, ["--model-name-or-path", "x", "--num_ppo_epochs", "2"]).policy == "x"
    dpo = parse_args(DPOConfig, ["--loss_type", "ipo", "--beta", "0.3", "--fp16", "false"])
    assert (dpo.loss, dpo.beta, dpo.dtype) == ("ipo", 0.3, "fp32")  # neither bf16 nor fp16: fp32, as transformers
    with pytest.raises(UsageError, match=r"^--gradient-accumulation-steps and --grad-accum both set --grad-accum; "
                                         r"give one$"):
        parse_args(SFTConfig, ["--gradient-accumulation-steps", "2", "--grad-accum", "3"])
    with pytest.raises(UsageError, match=r"^--bf16 and --fp16 are both true; give one --dtype$"):
        parse_args(SFTConfig, ["--bf16", "--fp16"])


@pytest.mark.parametrize("argv, hint", [
    (["--gradient_accumulation_steps", "4"], "ppo has no --grad-accum: an optimizer step takes --minibatch-size rows"),
    (["--per-device-train-batch-size", "4"], "ppo's --batch-size is the micro-batch of its training passes, as TRL's, "
                                             "but a rollout is --rollout-prompts × --n-samples rows"),
    (["--num-train-epochs", "1"], "ppo runs --iterations rollouts of --rollout-prompts prompts each"),
    (["--beta", "0.1"], "ppo's KL penalty is --kl-coef"),
    (["--lr_scheduler_type", "cosine"], "--schedule cosine, linear or constant decays to --min-lr-ratio × the peak"),
])
def test_a_trl_name_whose_meaning_differs_names_ours_and_the_difference(argv, hint):
    from rlhfkit.algos.ppo import PPOConfig

    with pytest.raises(UsageError) as e:
        parse_args(PPOConfig, argv)
    assert str(e.value).startswith(f"unknown config key {argv[0][2:].replace('-', '_')!r}; {hint}")


def test_an_unknown_last_flag_is_named_as_unknown():
    with pytest.raises(UsageError, match=r"^unknown config key 'xyzzy'$"):
        parse_args(SFTConfig, ["--lr", "1e-4", "--xyzzy"])


def test_a_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.001\nepochs: [3\n")
    with pytest.raises(UsageError, match=r"c\.yaml:3: not valid YAML \("):
        parse_args(SFTConfig, ["--config", str(p)])


def test_type_errors_name_the_key():
    with pytest.raises(UsageError, match="--epochs: expected int"):
        parse_args(SFTConfig, ["--epochs", "many"])
    with pytest.raises(UsageError, match="--packing: expected true or false"):
        parse_args(SFTConfig, ["--packing", "maybe"])


def test_every_field_is_documented():
    docs = field_docs(SFTConfig)
    assert {f.name for f in dataclasses.fields(SFTConfig)} == set(docs)


def test_list_options_take_several_values_or_commas():
    cfg = parse_args(SFTConfig, ["--lora-targets", "q_proj", "v_proj", "--epochs", "2"])
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.epochs == 2
    assert parse_args(SFTConfig, ["--lora-targets", "q_proj,k_proj"]).lora_targets == ["q_proj", "k_proj"]


def command_configs() -> dict[str, type]:
    """Every command's config class, from the CLI's own table and the label commands."""
    import importlib

    from rlhfkit.cli import ALGORITHMS, PreviewConfig
    from rlhfkit.label import commands

    configs = {" ".join(key): getattr(importlib.import_module(f"rlhfkit.{module}"), name)
               for key, (module, name, *_) in ALGORITHMS.items()}
    return {**configs, "data preview": PreviewConfig, "label serve": commands.ServeConfig,
            "label users add": commands.UsersAddConfig, "label export": commands.ExportConfig}


def test_every_numeric_option_of_every_command_has_a_range():
    import typing

    from rlhfkit.config import RANGES

    numeric = {int, float, int | None, float | None}
    missing = {f"{command}: --{key}" for command, cls in command_configs().items()
               for key, tp in typing.get_type_hints(cls).items() if tp in numeric and key not in RANGES}
    assert not missing, f"give these a range in rlhfkit.config.RANGES: {sorted(missing)}"


# the nonsense numbers a user tried, with the message each gets: tests/test_reliability.py


def test_out_of_range_is_caught_in_yaml_and_pipeline_overrides_too(tmp_path):
    from rlhfkit.config import from_dict
    from rlhfkit.pipeline import PipelineConfig, resolve

    p = tmp_path / "c.yaml"
    p.write_text("batch_size: 0\n")
    with pytest.raises(UsageError, match=r"^--batch-size 0: must be ≥ 1$"):
        parse_args(SFTConfig, ["--config", str(p)])
    with pytest.raises(UsageError, match=r"^pipeline.sft: --lr -1.0: must be ≥ 0$"):
        from_dict(SFTConfig, {**resolve(PipelineConfig(preset="tiny")).sft, "lr": -1.0}, "pipeline.sft")


def test_a_bad_number_exits_2_with_one_line():
    from tests.conftest import run_cli

    proc = run_cli("dpo", "--model", "tiny-llama", "--beta", "0", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: --beta 0.0: must be > 0\n"


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_every_pipeline_preset_loads_and_its_stage_options_are_valid(name):
    from rlhfkit.pipeline import PRESETS, PipelineConfig, resolve

    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == ["pipeline_default.yaml", "pipeline_tiny.yaml"]
    cfg = resolve(PipelineConfig(preset=name))  # every stage dict through its command's strict config
    assert cfg.model and cfg.sft and cfg.rm and cfg.ppo


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_in_configs_loads_for_the_command_its_first_line_names(path):
    first = path.read_text().splitlines()[0]
    command = first.removeprefix("# rlhfkit ").split(" --config")[0]
    assert first.startswith("# rlhfkit ") and command in command_configs(), first
    cfg = parse_args(command_configs()[command], ["--config", str(path)])
    assert dataclasses.asdict(cfg)  # every key known and well typed; ranges checked


def test_an_inherited_field_is_declared_again_only_to_change_its_default():
    # re-declared to re-document, a field would silently keep its old default when the base's changes: such
    # fields are re-told in RETOLD instead
    same = []
    for command, cls in command_configs().items():
        base = next((b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)), None)
        if base is None:
            continue
        inherited = {f.name: f for f in dataclasses.fields(base)}
        mine = {f.name: f for f in dataclasses.fields(cls)}
        default = lambda f: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # noqa: E731
        same += [f"{command}: --{name}" for name in cls.__dict__.get("__annotations__", {})
                 if name in inherited and default(mine[name]) == default(inherited[name])]
    assert not same, f"tell these in RETOLD instead of declaring them again: {same}"


def test_retold_fields_keep_their_own_help():
    from rlhfkit.algos.reward import RMConfig

    docs = field_docs(RMConfig)
    assert docs["batch_size"] == "Prompts per micro-batch on each process (each with all of its K responses)."
    assert RMConfig().batch_size == SFTConfig().batch_size  # the base's default, not a copy of it
