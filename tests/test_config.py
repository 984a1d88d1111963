"""Strict configs: YAML + overrides, unknown keys suggest the nearest valid key, values are type-checked."""

from __future__ import annotations

import pytest

from rlhfkit import UsageError
from rlhfkit.algos.sft import SFTConfig
from rlhfkit.config import field_docs, parse_args


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.001\nepochs: 3\nlora_targets: [q_proj]\n")
    cfg = parse_args(SFTConfig, ["--config", str(p), "--epochs", "5", "--packing", "--max-length=64"])
    assert cfg.lr == 0.001 and cfg.epochs == 5 and cfg.packing is True and cfg.max_length == 64
    assert cfg.lora_targets == ["q_proj"]


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(UsageError, match=r"unknown config key 'lerning_rate'|did you mean"):
        parse_args(SFTConfig, ["--lerning-rate", "1"])
    with pytest.raises(UsageError, match=r"did you mean --batch-size\?"):
        parse_args(SFTConfig, ["--batch-sise", "2"])
    p = tmp_path / "c.yaml"
    p.write_text("epoch: 3\n")
    with pytest.raises(UsageError, match=r"c\.yaml: unknown config key 'epoch'; did you mean --epochs\?"):
        parse_args(SFTConfig, ["--config", str(p)])


def test_type_errors_name_the_key():
    with pytest.raises(UsageError, match="--epochs: expected int"):
        parse_args(SFTConfig, ["--epochs", "many"])
    with pytest.raises(UsageError, match="--packing: expected true or false"):
        parse_args(SFTConfig, ["--packing", "maybe"])


def test_every_field_is_documented():
    docs = field_docs(SFTConfig)
    import dataclasses

    assert {f.name for f in dataclasses.fields(SFTConfig)} == set(docs)


def test_list_options_take_several_values_or_commas():
    cfg = parse_args(SFTConfig, ["--lora-targets", "q_proj", "v_proj", "--epochs", "2"])
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.epochs == 2
    assert parse_args(SFTConfig, ["--lora-targets", "q_proj,k_proj"]).lora_targets == ["q_proj", "k_proj"]
