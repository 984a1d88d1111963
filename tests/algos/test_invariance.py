"""What must not change a trainer's result: how a batch is cut into micro-batches (gradient accumulation, PPO's
micro-batches), and, as a guard against silent drift, the first losses of a fixed tiny run (golden values, fp32).

The golden values were recorded from this code on tiny-llama in fp32; they hold to 1e-4 relative on AVX2 and
AVX-512 kernels alike. A deliberate change of the maths updates them in the same commit, saying why.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import models
from rlhfkit.algos import dpo, ppo, reward, sft
from rlhfkit.tracking import read_metrics

from tests.conftest import train_losses

COMMON = dict(model="tiny-llama", max_steps=2, lr=1e-3, val_fraction=0.0, warmup_ratio=0.0, dtype="fp32",
              max_length=256, seed=3)
TRAINERS = {
    "sft": (sft.SFTConfig, sft.train, dict(data="sample:conversations")),
    "rm": (reward.RMConfig, reward.train, dict(data="sample:rankings", normalize=False)),
    "dpo": (dpo.DPOConfig, dpo.train, dict(data="sample:pairs")),
}
PPO = dict(policy="tiny-llama", reward_fn=str(Path(__file__).parent / "reward_fns.py") + ":vowel_fraction",
           iterations=2, max_new_tokens=8, dtype="fp32", lr=1e-3, critic_lr=1e-3, rollout_prompts=4, n_samples=2,
           missing_eos="none", kl_coef=0.05, minibatch_size=8, seed=3, sample_every=0)


def trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same_update(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    """Equal up to the float rounding of gradients summed in another order. AdamW divides by √v, so an element
    whose gradient is ~0 (an unseen token's embedding row) may move by up to lr either way on rounding alone: all
    but a few per million elements must agree to 1% of a step (seen: ≤ 4e-6 at lr 1e-3), and none by more than
    the steps taken (2 · lr)."""
    assert a.keys() == b.keys()
    far = 0
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert float(diff.max()) <= 2 * lr * 1.01, k
        far += int((diff > 0.01 * lr).sum())
    assert far <= 1e-5 * sum(v.numel() for v in a.values()), far


@pytest.mark.parametrize("name", list(TRAINERS))
def test_gradient_accumulation_gives_the_one_batch_update(tmp_path, name):
    cls, train, extra = TRAINERS[name]
    runs = {"whole": dict(batch_size=4, grad_accum=1), "halves": dict(batch_size=2, grad_accum=2),
            "singles": dict(batch_size=1, grad_accum=4)}
    for run, kw in runs.items():
        train(cls(**COMMON, **extra, **kw, output=str(tmp_path / run)))
    whole = trained(tmp_path / "whole")
    for run in ("halves", "singles"):
        assert_same_update(whole, trained(tmp_path / run), COMMON["lr"])
        assert train_losses(tmp_path / run) == pytest.approx(train_losses(tmp_path / "whole"), rel=1e-5)


def test_ppo_micro_batches_give_the_minibatch_update(tmp_path, tok):
    # one minibatch of 8 rows per update, run as 1, 2 or 8 micro-batches
    for batch_size in (8, 4, 1):
        ppo.train(ppo.PPOConfig(**PPO, batch_size=batch_size, output=str(tmp_path / f"mb{batch_size}")))
    whole = trained(tmp_path / "mb8")
    start = models.load_causal_lm("tiny-llama", seed=PPO["seed"], tokenizer=tok).state_dict()
    assert all(not torch.equal(whole[k], start[k]) for k in whole), "the policy did not move: nothing was compared"
    for batch_size in (4, 1):
        assert_same_update(whole, trained(tmp_path / f"mb{batch_size}"), PPO["lr"])
        score = lambda run: [m["ppo/score"] for m in read_metrics(tmp_path / run) if "ppo/score" in m]  # noqa: E731
        assert score(f"mb{batch_size}") == pytest.approx(score("mb8"), rel=1e-5)


# the first two logged losses of COMMON's run with 4 rows a step; PPO's first two iterations (the second's KL
# measures the first update)
GOLDEN = {
    "sft": [10.817649470949636, 10.782394109987745],
    "rm": [0.691866397857666, 0.6777916550636292],
    "dpo": [0.6931471824645996, 0.6833218336105347],  # ln 2 first: the policy is its own reference
}
GOLDEN_PPO = {"ppo/score": [0.32128414511680603, 0.34112536907196045],
              "ppo/value_loss": [0.03719942644238472, 0.037777937948703766], "ppo/kl": [0.0, -0.04236912727355957]}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_golden_first_losses(tmp_path, name):
    cls, train, extra = TRAINERS[name]
    train(cls(**COMMON, **extra, batch_size=4, output=str(tmp_path / "out")))
    assert train_losses(tmp_path / "out") == pytest.approx(GOLDEN[name], rel=1e-4)


def test_golden_first_ppo_losses(tmp_path):
    ppo.train(ppo.PPOConfig(**PPO, batch_size=8, output=str(tmp_path / "out")))
    for key, values in GOLDEN_PPO.items():
        assert [m[key] for m in read_metrics(tmp_path / "out") if key in m] == pytest.approx(values, rel=1e-4,
                                                                                               abs=1e-7), key


def test_a_changed_hyperparameter_changes_the_update(tmp_path):
    # the equality tests above could pass on runs that ignore their inputs; this one cannot
    cls, train, extra = TRAINERS["sft"]
    base = cls(**COMMON, **extra, batch_size=4, output=str(tmp_path / "a"))
    train(base)
    train(replace(base, lr=2e-3, output=str(tmp_path / "b")))
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)
