"""Each form a command-line source takes, parsed once; a form the option does not take is one error naming it."""

from __future__ import annotations

import pytest

from rlhfkit import UsageError
from rlhfkit.data import sources
from rlhfkit.data.sources import Source

SCORERS = ("gold", "rm", "db", "fn")


@pytest.mark.parametrize("spec, kinds, expected", [
    ("train.jsonl", sources.DATA, Source("file", "train.jsonl")),
    ("sample:prompts", sources.DATA, Source("sample", "prompts")),
    ("sim:eval", sources.DATA, Source("sim", "eval")),
    ("rm:runs/rm", SCORERS, Source("rm", "runs/rm")),
    ("db:labels.sqlite", SCORERS, Source("db", "labels.sqlite")),
    ("sim", SCORERS, Source("gold", "")),
    ("rlhfkit.sim.tasks:gold_reward", SCORERS, Source("fn", "rlhfkit.sim.tasks:gold_reward")),
    ("fns.py:score", SCORERS, Source("fn", "fns.py:score")),
    ("responses:best.jsonl", ("responses", "model"), Source("responses", "best.jsonl")),
    ("runs/sft", ("responses", "model"), Source("model", "runs/sft")),
])
def test_each_form_parses_to_its_kind(spec, kinds, expected):
    assert sources.parse(spec, "--x", kinds) == expected


@pytest.mark.parametrize("spec, option, kinds, message", [
    ("db:x.sqlite", "--monitor", ("rm", "fn"), "--monitor 'db:x.sqlite': expected rm:DIR or module:function"),
    ("sim", "--monitor", ("rm", "fn"), "--monitor 'sim': expected rm:DIR or module:function"),
    ("rm:runs/rm", "data source", sources.DATA,
     "data source 'rm:runs/rm': expected sample:NAME or sim:SPLIT or a data file"),
    ("runs/rm", "--judge", ("gold", "rm", "db"), "--judge 'runs/rm': expected sim or rm:DIR or db:FILE"),
])
def test_a_form_the_option_does_not_take_is_one_error_naming_it(spec, option, kinds, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(")):
        sources.parse(spec, option, kinds)
