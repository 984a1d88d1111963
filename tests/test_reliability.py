"""The reliability case table: every input a careful user tried that once crashed a command with a traceback,
"succeeded" with nonsense or lost work, and the one message and exit code it gets now. A new command inherits the
table by adding its rows. Cases that need more than one command line live beside what they test and are listed at
the end of this file.

Each case runs `rlhfkit ARGV` in-process (`cli.main`); {tmp} in ARGV is the test's directory, which holds the
files of `FILES`.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from rlhfkit import cli

SFT = ["sft", "--model", "tiny-llama", "--data", "sample:conversations", "--batch-size", "2"]
PPO = ["ppo", "--policy", "tiny-llama", "--reward-fn", "rlhfkit.sim.tasks:gold_reward", "--prompts",
       "sample:prompts", "--rollout-prompts", "2", "--n-samples", "2", "--max-new-tokens", "4", "--iterations", "1"]

# name -> content of the files the cases read
FILES = {
    "latin1.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"),
    "broken.yaml": b"lr: 0.001\nepochs: [3\n",
    "a_file": b"",
    "nan_margin.jsonl": b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1}\n'
                        b'{"prompt": "a", "chosen": "b", "rejected": "d", "margin": NaN}\n',
    "empty_rows.jsonl": b'{"prompt": "Say hi.", "completion": "Hi!"}\n{"prompt": "", "completion": ""}\n'
                        b'{"prompt": "Say bye.", "completion": "Bye!"}\n{"prompt": "Say yes.", "completion": " "}\n',
    "empty_prompt.jsonl": b'{"prompt": "Hello?"}\n{"prompt": "  "}\n',
    "long_prompt.jsonl": json.dumps({"prompt": "word " * 3000}).encode() + b"\n",
    "short_and_long.jsonl": json.dumps({"prompt": "word " * 600}).encode() + b"\n",
    "kto.jsonl": b'{"prompt": "Say hi.", "completion": "Hi!", "label": true}\n'
                 b'{"prompt": "Say hi.", "completion": "Go away.", "label": false}\n',
    "hh_no_prompt.jsonl": json.dumps({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
                                      "rejected": "\n\nHuman: Hey\n\nAssistant: Yo."}).encode() + b"\n",
    "ranked_and_scored.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "scores": [2, 1]}\n',
}

# (case, ARGV, exit code, the error line (stderr) or, for a success, a line of stdout, as a regex)
CASES = [
    # nonsense numbers: refused where configs are parsed, naming the option and its range
    ("negative batch size", [*SFT, "--batch-size", "-3"], 2, r"error: --batch-size -3: must be ≥ 1"),
    ("zero batch size", [*SFT, "--batch-size", "0"], 2, r"error: --batch-size 0: must be ≥ 1"),
    ("zero grad accum", [*SFT, "--grad-accum", "0"], 2, r"error: --grad-accum 0: must be ≥ 1"),
    ("negative lr", [*SFT, "--lr", "-1e-5"], 2, r"error: --lr -1e-05: must be ≥ 0"),
    ("nan lr", ["rm", "--lr", "nan"], 2, r"error: --lr nan: must be ≥ 0"),
    ("negative save steps", [*SFT, "--save-steps", "-5"], 2, r"error: --save-steps -5: must be ≥ 0"),
    ("negative warm-up", [*SFT, "--warmup-ratio", "-1"], 2, r"error: --warmup-ratio -1.0: must be in \[0, 1\]"),
    ("all data held out", [*SFT, "--val-fraction", "1.0"], 2, r"error: --val-fraction 1.0: must be in \[0, 1\)"),
    ("LoRA rank 0", [*SFT, "--lora-r", "0"], 2, r"error: --lora-r 0: must be ≥ 1"),
    ("DPO beta 0", ["dpo", "--beta", "0"], 2, r"error: --beta 0.0: must be > 0"),
    ("no rollout prompts", ["ppo", "--rollout-prompts", "0"], 2, r"error: --rollout-prompts 0: must be ≥ 1"),
    ("top-p 0", ["ppo", "--top-p", "0"], 2, r"error: --top-p 0.0: must be in \(0, 1\]"),
    ("score batch 0", ["score", "--batch-size", "0"], 2, r"error: --batch-size 0: must be ≥ 1"),
    ("generate n 0", ["generate", "--n", "0"], 2, r"error: --n 0: must be ≥ 1"),
    ("no such context", ["distill-context", "--model", "tiny-llama", "--context", "nope", "--output", "{tmp}/d"], 2,
     r"error: --context 'nope': no such file, and no shipped context of that name \(hhh\)"),
    ("negative temperature", ["eval", "--temperature", "-0.5"], 2, r"error: --temperature -0.5: must be ≥ 0"),
    ("port out of range", ["label", "serve", "--port", "70000"], 2, r"error: --port 70000: must be in \[1, 65535\]"),
    ("no tensor parallelism (plan)", ["plan", "--rollout-tp", "0"], 2, r"error: --rollout-tp 0: must be ≥ 1"),
    # other settings: one line naming the key
    ("unknown dtype", [*SFT, "--dtype", "bogus"], 2,
     r"error: --dtype 'bogus': expected auto, bf16, bfloat16, fp16, float16, half, fp32, float32, float"),
    ("unknown GPU (plan)", ["plan", "--gpu", "v100"], 2,
     r"error: --gpu 'v100': unknown; known: a100-40g, a100-80g, h100-80g, h200, l40s, a10g, rtx4090"),
    ("Ray placement without --backend ray", [*PPO, "--actor-workers", "2", "--output", "{tmp}/p"], 2,
     r"error: --ray-address, --colocate, --rollout-engines, --actor-workers and --critic-workers place the roles of "
     r"--backend ray; add --backend ray"),
    ("ZeRO in a Ray role group", [*PPO, "--backend", "ray", "--sharding", "zero2", "--output", "{tmp}/p"], 2,
     r"error: --backend ray trains a role group with --sharding ddp or fsdp2, not zero2 .*use --backend local for "
     r"ZeRO"),
    ("unknown last flag", [*SFT, "--xyzzy"], 2, r"error: unknown config key 'xyzzy'$"),
    ("TRL name meaning otherwise (ppo)", [*PPO, "--gradient-accumulation-steps", "4"], 2,
     r"error: unknown config key 'gradient_accumulation_steps'; ppo has no --grad-accum: an optimizer step takes "
     r"--minibatch-size rows, --batch-size at a time"),
    ("YAML syntax error", [*SFT, "--config", "{tmp}/broken.yaml"], 2,
     r"error: \S+/broken.yaml:3: not valid YAML \(expected ',' or '\]', but got '<stream end>'\)"),
    # paths
    ("output is a file (trainer)", [*SFT, "--output", "{tmp}/a_file"], 2,
     r"error: --output \S+/a_file: a file of that name exists; name a directory"),
    ("output is a directory (generate)", ["generate", "--model", "tiny-llama", "--output", "{tmp}"], 2,
     r"error: --output \S+: a directory of that name exists; name a file"),
    ("output under a file (score)", ["score", "--reward-model", "{tmp}", "--output", "{tmp}/a_file/s.jsonl"], 2,
     r"error: --output \S+/a_file/s.jsonl: \S+/a_file is a file, not a directory"),
    ("output is a file (eval)", ["eval", "--models", "tiny-llama", "--output", "{tmp}/a_file"], 2,
     r"error: --output \S+/a_file: a file of that name exists; name a directory"),
    ("output is a directory (best-of-n)", ["best-of-n", "--policy", "tiny-llama", "--reward-fn",
                                           "rlhfkit.sim.tasks:gold_reward", "--output", "{tmp}"], 2,
     r"error: --output \S+: a directory of that name exists; name a file"),
    ("output is a file (pipeline)", ["pipeline", "--output", "{tmp}/a_file"], 2,
     r"error: --output \S+/a_file: a file of that name exists; name a directory"),
    ("output is a file (label export)", ["label", "export", "--output", "{tmp}/a_file"], 2,
     r"error: --output \S+/a_file: a file of that name exists; name a directory"),
    ("database under a file", ["label", "users", "add", "--name", "ann", "--db", "{tmp}/a_file/l.sqlite"], 1,
     r"error: --db \S+/a_file/l.sqlite: cannot open the database \(unable to open database file\)"),
    ("unknown user (users revoke; an empty file is an empty database)",
     ["label", "users", "revoke", "zed", "--db", "{tmp}/a_file"], 1, r"error: no user named 'zed'"),
    ("missing database (export)", ["label", "export", "--db", "{tmp}/none.sqlite", "--output", "{tmp}/x"], 1,
     r"error: --db \S+/none.sqlite: no such database \(it is made by `rlhfkit label serve` or `label users add`\)"),
    ("missing reward model (ppo)", ["ppo", "--reward-model", "{tmp}/no_rm"], 1,
     r"error: reward model \S+/no_rm: no such directory \(give the --output of `rlhfkit rm`\)"),
    ("missing reward model (score)", ["score", "--reward-model", "{tmp}/no_rm"], 1,
     r"error: reward model \S+/no_rm: no such directory \(give the --output of `rlhfkit rm`\)"),
    # data: FILE:LINE, or skipped and counted
    ("non-UTF-8 data", [*SFT, "--data", "{tmp}/latin1.jsonl"], 1,
     r"error: \S+/latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8"),
    ("NaN margin", ["rm", "--model", "tiny-llama", "--data", "{tmp}/nan_margin.jsonl", "--output", "{tmp}/rm"], 1,
     r"error: \S+/nan_margin.jsonl:2: margin must be a finite number, got nan"),
    ("KTO label column (sft)", [*SFT, "--data", "{tmp}/kto.jsonl", "--output", "{tmp}/k"], 1,
     r"error: \S+/kto.jsonl:1: the column 'label' holds unpaired feedback \(KTO-style: whether the completion is "
     r"good\), which this command does not use; .*"),
    ("HH pair without a shared prompt", ["rm", "--model", "tiny-llama", "--data", "{tmp}/hh_no_prompt.jsonl",
                                         "--output", "{tmp}/rm"], 1,
     r"error: \S+/hh_no_prompt.jsonl:1: chosen and rejected share no prefix that ends at an '\\n\\nAssistant:' "
     r"turn \(they differ from character 10\)"),
    ("ranking and scores in one row", ["dpo", "--model", "tiny-llama", "--data", "{tmp}/ranked_and_scored.jsonl",
                                       "--output", "{tmp}/d"], 1,
     r"error: \S+/ranked_and_scored.jsonl:1: the columns \['prompt', 'ranking', 'responses', 'scores'\] fit more "
     r"than one format: rankings \(prompt, responses, ranking\) and scored \(prompt, responses, scores\); name the "
     r"one meant with --format"),
    ("empty prompt", ["generate", "--model", "tiny-llama", "--prompts", "{tmp}/empty_prompt.jsonl", "--output",
                      "{tmp}/g.jsonl"], 1,
     r"error: \S+/empty_prompt.jsonl:2: the prompt is empty"),
    ("empty responses are skipped and counted",
     [*SFT, "--data", "{tmp}/empty_rows.jsonl", "--max-steps", "1", "--val-fraction", "0", "--output", "{tmp}/e"],
     0, r"data: 0 examples truncated to 512 tokens, 0 skipped \(no response token left\), 2 skipped \(empty "
        r"response\)"),
    # limits
    ("prompt past the model's positions", ["generate", "--model", "tiny-llama", "--prompts",
                                           "{tmp}/long_prompt.jsonl", "--output", "{tmp}/g.jsonl"], 2,
     r"error: prompt 1 of 1 is 30\d\d tokens long after the chat template; with --max-new-tokens 256 it needs "
     r"3\d\d\d positions and the model has 2048: shorten the prompt or lower --max-new-tokens"),
    ("every prompt past PPO's --max-length", [*PPO, "--prompts", "{tmp}/short_and_long.jsonl", "--output",
                                             "{tmp}/p"], 1,
     r"error: \S+/short_and_long.jsonl: every prompt is longer than --max-length 512 tokens \(the first: "
     r"\S+/short_and_long.jsonl:1\); raise --max-length"),
    # runs that cannot learn say so
    ("lr far too high", [*SFT, "--lr", "1e6", "--warmup-ratio", "0", "--max-steps", "8", "--output", "{tmp}/hot"], 1,
     r"error: the gradient has been exactly 0 for 3 steps in a row \(steps 2–4, loss 10.8\): the model has stopped "
     r"learning, typically saturated by too high a learning rate \(--lr 1e\+06\)\. Lower --lr and run again\."),
]


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)  # what a case writes by default (runs/…, label.sqlite) stays in its directory
    return tmp_path


@pytest.mark.parametrize("argv, code, line", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_case(argv, code, line, case_dir, capsys):
    assert cli.main([a.replace("{tmp}", str(case_dir)) for a in argv]) == code
    out, err = capsys.readouterr()
    lines = (err if code else out).splitlines()
    assert any(re.fullmatch(line, x) for x in lines), f"no line matches {line!r} in:\n" + "\n".join(lines[-8:])
    if code:
        assert "Traceback" not in err and err.count("error:") == 1


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    # it used to train 0 steps and rewrite run.json without the final loss
    run = [*SFT, "--max-steps", "2", "--save-steps", "2", "--output", str(tmp_path / "r")]
    assert cli.main(run) == 0
    record = (tmp_path / "r" / "run.json").read_text()
    weights = (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main([*run, "--resume"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"r: finished at step 2 of 2, nothing to do \(to train on, raise --max-steps", out), out
    assert json.loads(out.splitlines()[-1]) == json.loads(record)["final_metrics"]
    assert "train/loss" in json.loads(record)["final_metrics"] and json.loads(record)["status"] == "finished"
    assert (tmp_path / "r" / "run.json").read_text() == record
    assert (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns == weights


def test_the_table_covers_every_command():
    tested = {tuple(itertools.takewhile(lambda a: not a.startswith("-"), argv)) for _, argv, *_ in CASES}
    commands = {key for key in cli.COMMANDS if key != ("data", "preview")}
    missing = {" ".join(k) for k in commands if not any(t[:len(k)] == k for t in tested)}
    assert not missing, f"add reliability cases for: {sorted(missing)}"


# Cases with a test of their own, where one command line is not enough:
# - checkpoints pruned by what this run wrote, a dangling `latest`, --resume over a changed config, a run directory
#   resumed from a new place: tests/test_checkpoint.py
# - a full disk while writing a checkpoint or the final model: tests/test_checkpoint.py
# - --resume leaves no duplicate steps in metrics.jsonl or samples.jsonl: tests/algos/test_sft.py, test_ppo.py
# - the label server's 4xx for surrogates, 64-bit overflow, deep JSON and odd digits: tests/label/test_label_http.py
# - an exception inside --reward-fn names the function and the row: tests/algos/test_best_of_n.py
# - a directory another live process holds, --overwrite: tests/test_tracking.py
