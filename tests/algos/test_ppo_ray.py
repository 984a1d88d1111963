"""PPO with --backend ray on a local Ray cluster: the roles as Ray actors make the in-process run's updates, in any
placement; a role that dies stops the run with one message, and --resume then finishes the uninterrupted run (one
run tests all three: Ray workers start slowly, and the default tier has a time budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.algos import ppo, ppo_ray
from rlhfkit.tracking import read_metrics

from tests.algos.test_ppo import cfg_for, logged
from tests.conftest import rewind

ray = pytest.importorskip("ray")

# GAE (actor, critic, reference, reward and the rollout engine: every role), with clipping and 2 minibatches
SETTINGS = dict(advantage="gae", n_samples=2, rollout_prompts=4, iterations=5, minibatch_size=4, batch_size=2,
                max_grad_norm=0.5, save_steps=1)
COMPARED = ("ppo/score", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/explained_variance")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster the test process drives, as `ray start --head` would give a user."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, sft_policy):
    cfg = cfg_for(tmp_path_factory.mktemp("local"), sft_policy, **SETTINGS)
    ppo.train(cfg)
    return Path(cfg.output)


def assert_same_run(a: Path, b: Path, abs: float = 1e-5, weights_rtol: float = 0.0, weights_atol: float = 1e-5
                    ) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, SETTINGS["iterations"] + 1))
    for x, y in zip(ma, mb):
        for key in COMPARED:
            assert (key in x) == (key in y), (x["step"], key)  # no policy loss while the critic warms up
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=abs), (x["step"], key)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=weights_rtol, atol=weights_atol, msg=k)


def test_placement_groups_follow_colocate():
    cfg = ppo.PPOConfig(reward_fn="m:f", rollout_engines=2)
    assert ppo_ray.bundles(cfg) == [["actor", "critic", "ref", "reward", "rollout0", "rollout1"]]
    assert ppo_ray.bundles(replace(cfg, colocate="actor-ref")) == [
        ["actor", "ref"], ["critic"], ["reward"], ["rollout0"], ["rollout1"]]
    assert ppo_ray.bundles(replace(cfg, colocate="critic-reward", advantage="rloo", lora=True)) == [
        ["reward"], ["actor"], ["rollout0"], ["rollout1"]]  # no critic, and the actor is its own reference
    assert len(ppo_ray.bundles(replace(cfg, colocate="none"))) == 6


@pytest.mark.slow  # 33 s; the default run keeps the role groups' test, which also resumes
def test_a_role_that_dies_stops_the_run_and_resume_in_another_placement_finishes_the_in_process_run(
        tmp_path, sft_policy, in_process, cluster):
    # iterations 1-2 with every role on its own (six workers, the prompts split over two engines, every step's
    # clipping norm joined from two) until the critic's worker is killed, the rest with every role in one bundle: the
    # whole run is the in-process one, so each placement makes its iterations as one process does
    cfg = cfg_for(tmp_path, sft_policy, **SETTINGS, backend="ray", colocate="none", rollout_engines=2,
                  ray_address=cluster)
    assert {tuple(b) for b in ppo_ray.bundles(cfg)} == {(r,) for r in ppo_ray.role_names(cfg)}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(cfg).items()
            if v is not None and k in ("policy", "reward_fn", "output", "backend", "colocate", "ray_address", "seed",
                                       *SETTINGS, "max_new_tokens", "dtype", "lr", "critic_lr", "missing_eos",
                                       "kl_coef", "sample_every", "rollout_engines")]
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "ppo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    metrics, deadline = Path(cfg.output) / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and len(read_metrics(Path(cfg.output))) >= 2) and proc.poll() is None:
        assert time.time() < deadline, "the run never logged 2 iterations"
        time.sleep(0.05)
    ray.kill(ray.get_actor(ppo_ray.worker_name(cfg, "critic"), namespace=ppo_ray.NAMESPACE))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: --backend ray: the critic role's worker died"), message
    assert "last checkpoint:" in message and "step-000000" in message and "--resume" in message, message
    logged = [m["step"] for m in read_metrics(Path(cfg.output))]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < SETTINGS["iterations"]

    ppo.train(replace(cfg, resume=True, colocate="all", rollout_engines=1))
    assert_same_run(in_process, Path(cfg.output))


def test_actor_and_critic_as_fsdp2_groups_of_two_workers_train_as_one_process_and_resume(
        tmp_path, sft_policy, cluster):
    # each trained role sharded over two Ray workers (a gloo process group each), every role on the same two
    # bundles: each worker passes and trains on its half of the rows, the driver joins them, and a run stopped after
    # iteration 3, then rewound to its checkpoint of iteration 1, resumes from the workers' sharded checkpoints to
    # the in-process run. The first iteration trains the critic alone (--critic-warmup), so that checkpoint holds no
    # AdamW state of the actor. At the other tests' lr of 1e-2 the KL reaches 30 and float rounding grows to 1% of
    # some statistics; at 1e-3 it stays near 1e-6
    one = cfg_for(tmp_path / "one", sft_policy, **SETTINGS, lr=1e-3, critic_lr=1e-3, critic_warmup=1)
    ppo.train(one)
    cfg = replace(one, output=str(tmp_path / "groups"), backend="ray", ray_address=cluster, actor_workers=2,
                  critic_workers=2, sharding="fsdp2")
    assert ppo_ray.bundles(cfg) == [["actor", "critic", "ref", "reward", "rollout0"]]
    ppo.train(replace(cfg, iterations=3, save_total_limit=3))
    assert sorted(p.name for p in (Path(cfg.output) / "checkpoints" / "step-0000003" / "critic").iterdir()) == [
        "scheduler.pt", "shards"]
    rewind(Path(cfg.output), 1)
    ppo.train(replace(cfg, resume=True))
    # the processes sum their rows' gradients in another order: Adam's 1/sqrt(v) can move a weight whose gradient is
    # ~0 by a fraction of an lr-sized step (the tolerances of test_ppo's two-process test, torchrun's FSDP2)
    assert_same_run(Path(one.output), Path(cfg.output), abs=1e-6, weights_rtol=1e-3, weights_atol=1e-4)
    assert logged(Path(cfg.output), "ppo/kl")[-1] > 0.1  # the policy moved
    run = json.loads((Path(cfg.output) / "run.json").read_text())
    assert (run["sharding"], run["workers"]) == ("fsdp2", {"actor": 2, "critic": 2, "ref": 1, "reward": 1,
                                                           "rollout0": 1})


def test_without_ray_the_backend_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from rlhfkit.cli import main; "  # Ray absent: import fails
            f"sys.exit(main(['ppo', '--backend', 'ray', '--policy', 'tiny-llama', '--reward-fn', 'm:f', "
            f"'--output', {str(tmp_path / 'out')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --backend ray needs Ray, which is not installed here: pip install 'rlhfkit[ray]' (scripts/setup "
        "installs it)")
