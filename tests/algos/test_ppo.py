"""PPO on a tiny SFT'd model with a programmatic reward: learning per estimator, KL control, ratio = 1, resume."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import UsageError, forward, models
from rlhfkit.algos import ppo, reward
from rlhfkit.core import rl
from rlhfkit.data import chat
from rlhfkit.data.collate import collate
from rlhfkit.tracking import read_metrics

from tests.conftest import launch_and_kill, rewind, run_cli, run_distributed, write_jsonl

REWARD_FN = str(Path(__file__).parent / "reward_fns.py") + ":a_fraction"
RECORDED_FN = str(Path(__file__).parent / "reward_fns.py") + ":recorded_a_fraction"


def cfg_for(tmp_path: Path, policy: str, **kw) -> ppo.PPOConfig:
    defaults = dict(policy=policy, reward_fn=REWARD_FN, output=str(tmp_path / "out"), iterations=10,
                    max_new_tokens=8, dtype="fp32", lr=1e-2, critic_lr=1e-2, rollout_prompts=8, n_samples=4,
                    missing_eos="none", kl_coef=0.01, minibatch_size=32, seed=1, sample_every=0)
    defaults.update(kw)
    return ppo.PPOConfig(**defaults)


def logged(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if key in m]


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo", "reinforce++"])
def test_each_estimator_raises_the_reward_with_bounded_kl(tmp_path, sft_policy, advantage):
    critic_free = advantage in ("grpo", "rloo")
    cfg = cfg_for(tmp_path, sft_policy, advantage=advantage, n_samples=4 if critic_free else 1,
                  rollout_prompts=8 if critic_free else 32, iterations=14)
    ppo.train(cfg)
    scores, kls = logged(tmp_path / "out", "ppo/score"), logged(tmp_path / "out", "ppo/kl")
    start, end = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    # the margin holds for seeds 0-4 on AVX2 and on AVX-512 kernels (benchmarks/RESULTS.md, "PPO learning-test
    # margins"): from ≈ 0.02-0.11 to ≥ 0.73. 14 iterations, because a slow start (GAE's critic) sometimes takes
    # 6 of them, and at lr 1e-2 a run near 1.0 can also drop back by 0.3 in its last iterations (RLOO)
    assert end > start + 0.5, scores
    assert all(math.isfinite(k) for k in kls) and max(kls) < 70, kls  # nats per 8-token response


def test_larger_beta_stays_closer_to_the_reference(tmp_path, sft_policy):
    base = cfg_for(tmp_path, sft_policy, advantage="reinforce++", n_samples=1, rollout_prompts=32, iterations=6)
    ppo.train(replace(base, output=str(tmp_path / "small"), kl_coef=0.01))
    ppo.train(replace(base, output=str(tmp_path / "large"), kl_coef=1.0))
    small, large = logged(tmp_path / "small", "ppo/kl"), logged(tmp_path / "large", "ppo/kl")
    assert sum(large[-3:]) < 0.5 * sum(small[-3:]), (small, large)


def test_ratio_is_one_while_the_weights_have_not_moved(tmp_path, sft_policy):
    # lr 0: every minibatch of every epoch recomputes the rollout's log-probs in other batch compositions
    cfg = cfg_for(tmp_path, sft_policy, advantage="gae", n_samples=1, iterations=2, lr=0.0, critic_lr=0.0,
                  ppo_epochs=2, minibatch_size=3, batch_size=2)
    ppo.train(cfg)
    assert max(logged(tmp_path / "out", "ppo/ratio_dev_max")) < 1e-5
    assert max(abs(c) for c in logged(tmp_path / "out", "ppo/clipfrac")) == 0


def test_on_policy_grpo_skips_the_old_log_prob_pass_and_makes_the_same_update(tmp_path, sft_policy, monkeypatch):
    # one epoch of one minibatch: the update's own forward stands in for the separate old-log-prob pass (TRL's
    # shortcut); the weights, scores and KL must be those of the run that makes the pass
    cfg = cfg_for(tmp_path, sft_policy, advantage="grpo", iterations=2, rollout_prompts=4, minibatch_size=16,
                  batch_size=16, kl_coef=0.1)
    assert ppo.on_policy(cfg, 16) and not ppo.on_policy(replace(cfg, ppo_epochs=2), 16)
    passes = []  # forward passes without a graph: the reference's, and the old-log-prob pass unless skipped
    plain = ppo.token_logprobs
    monkeypatch.setattr(ppo, "token_logprobs", lambda *a, **k: passes.append(torch.is_grad_enabled()) or plain(*a, **k))
    ppo.train(replace(cfg, output=str(tmp_path / "fast")))
    fast_passes, passes[:] = passes.count(False), []
    monkeypatch.setattr(ppo, "on_policy", lambda cfg, rows: False)
    ppo.train(replace(cfg, output=str(tmp_path / "plain")))
    assert (fast_passes, passes.count(False)) == (2, 4)  # per iteration: the reference; the reference and the old
    a, b = load_file(tmp_path / "fast" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    for key in ("ppo/score", "ppo/kl"):
        assert len(logged(tmp_path / "fast", key)) == 2, key
        assert logged(tmp_path / "fast", key) == pytest.approx(logged(tmp_path / "plain", key), abs=1e-5), key
    assert logged(tmp_path / "fast", "ppo/ratio_dev_max") == [0.0, 0.0]


def test_entropy_logged_without_a_graph_leaves_the_update_as_it_was(tmp_path, sft_policy, monkeypatch):
    # entropy_coef 0: the entropy is a statistic, computed without a backward pass through its (M, V) softmax;
    # the weights and the logged entropy must be the same bits as a run that keeps its graph (0 · gradient)
    cfg = cfg_for(tmp_path, sft_policy, advantage="rloo", iterations=2, rollout_prompts=4, minibatch_size=8,
                  batch_size=4)
    ppo.train(replace(cfg, output=str(tmp_path / "fast")))
    plain = ppo.token_logprobs
    monkeypatch.setattr(ppo, "token_logprobs", lambda *a, **k: plain(*a, **{**k, "entropy_grad": True}))
    ppo.train(replace(cfg, output=str(tmp_path / "plain")))
    a, b = load_file(tmp_path / "fast" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert any(not torch.equal(a[k], load_file(Path(sft_policy) / "model.safetensors")[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert logged(tmp_path / "fast", "ppo/entropy") == logged(tmp_path / "plain", "ppo/entropy")
    # and the statistic really has no graph, while the log-probs keep theirs
    rollout = ppo.Rollout(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                          prompt_index=torch.zeros(1, dtype=torch.long), pad_id=0, response_mask=torch.ones(1, 2),
                          logprobs=None, ref_logprobs=None, values=None, scores=torch.zeros(1))
    actor = forward.SelectedLogits(models.load_causal_lm(sft_policy))
    logps, entropy = plain(actor, rollout, 1.0, with_entropy=True, entropy_grad=False)
    assert logps.requires_grad and not entropy.requires_grad


def test_every_trainable_parameter_of_actor_and_critic_changes(tmp_path, sft_policy):
    cfg = cfg_for(tmp_path, sft_policy, advantage="gae", n_samples=1, iterations=2, save_steps=2)
    ppo.train(cfg)
    before = load_file(Path(sft_policy) / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    ckpt = load_file(tmp_path / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    critic_head = ckpt["critic.model.score.weight"]
    assert critic_head.abs().sum() > 0  # zero-initialised, then trained


def test_critic_warmup_trains_the_critic_alone_then_both(tmp_path, sft_policy):
    ppo.train(cfg_for(tmp_path, sft_policy, advantage="gae", n_samples=1, iterations=3, critic_warmup=2,
                      save_steps=1))
    before = load_file(Path(sft_policy) / "model.safetensors")
    warm, last = (load_file(tmp_path / "out" / "checkpoints" / f"step-{s:07d}" / "trainable.safetensors")
                  for s in (2, 3))
    actor = {k: k.removeprefix("actor.lm.") for k in warm if k.startswith("actor.")}
    assert actor and all(torch.equal(warm[k], before[name]) for k, name in actor.items())  # two iterations: unmoved
    assert warm["critic.model.score.weight"].abs().sum() > 0  # zero-initialised, then trained
    assert all(not torch.equal(warm[k], last[k]) for k in warm)  # the third iteration trains both
    metrics = read_metrics(tmp_path / "out")
    assert ["ppo/policy_loss" in m for m in metrics] == [False, False, True]
    assert all(m["ppo/value_loss"] > 0 for m in metrics)


def test_frozen_blocks_stay_and_every_other_weight_changes(tmp_path, sft_policy):
    # the pipeline's preset: GAE with the lowest blocks and the embeddings frozen, in the actor and in the critic
    ppo.train(cfg_for(tmp_path, sft_policy, advantage="gae", iterations=2, freeze_layers=1, save_steps=2))
    before = load_file(Path(sft_policy) / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    frozen = {k for k in before if k.startswith(("model.embed_tokens", "model.layers.0."))}
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert [k for k in before if k not in frozen and torch.equal(before[k], after[k])] == []
    trained = load_file(tmp_path / "out" / "checkpoints" / "step-0000002" / "trainable.safetensors")
    critic = [k.removeprefix("critic.model.") for k in trained if k.startswith("critic.")]
    assert "model.layers.1.mlp.up_proj.weight" in critic and "score.weight" in critic
    assert [k for k in critic if k.startswith(("model.embed_tokens", "model.layers.0."))] == []


@pytest.mark.parametrize("critic_warmup", [0, 3])  # 3: the checkpoint at 2 holds no AdamW state of the actor
def test_resume_two_plus_two_equals_four_bit_exact(tmp_path, sft_policy, critic_warmup):
    straight = cfg_for(tmp_path, sft_policy, output=str(tmp_path / "straight"), advantage="gae", n_samples=1,
                       iterations=4, rollout_prompts=4, adaptive_kl=True, sample_every=1, critic_warmup=critic_warmup)
    ppo.train(straight)
    split = replace(straight, output=str(tmp_path / "split"), save_steps=2)
    ppo.train(split)
    rewind(tmp_path / "split", 2)
    ppo.train(replace(split, resume=True))
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # iterations 3 and 4, which the interrupted run had logged too, appear once
    assert logged(tmp_path / "split", "ppo/beta") == logged(tmp_path / "straight", "ppo/beta")
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    samples = lambda run: (tmp_path / run / "samples.jsonl").read_text().splitlines()  # noqa: E731
    assert samples("split") == samples("straight") and len(samples("straight")) == 4 * 4


def test_adaptive_kl_follows_the_controller(tmp_path, sft_policy):
    cfg = cfg_for(tmp_path, sft_policy, advantage="rloo", iterations=3, adaptive_kl=True, kl_coef=0.1,
                  kl_target=1.0, kl_horizon=100)
    ppo.train(cfg)
    betas, kls = logged(tmp_path / "out", "ppo/beta"), logged(tmp_path / "out", "ppo/kl")
    for i in range(2):
        assert betas[i + 1] == pytest.approx(rl.adaptive_kl_coef(betas[i], kls[i], 1.0, 100, 32))


def test_ptx_loss_is_the_token_mean_nll_of_transformers(tok, sft_policy):
    model = models.load_causal_lm(sft_policy, tokenizer=tok).eval()
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
             [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."}]]
    rows = [chat.tokenize_conversation(tok, c) for c in convs]
    net = torch.nn.ModuleDict({"actor": forward.SelectedLogits(model)})
    ours = ppo.ptx_loss(net, rows, tok.pad_token_id, "cpu")
    batch = collate(rows, tok.pad_token_id)
    labels = batch.input_ids.masked_fill(~batch.loss_mask, -100)
    theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_ptx_run_logs_its_loss(tmp_path, sft_policy):
    final = ppo.train(cfg_for(tmp_path, sft_policy, advantage="rloo", iterations=1, ptx_data="sample:conversations",
                              ptx_coef=0.5))
    assert 0 < final["ppo/ptx_loss"] < 20


def test_lora_reference_is_the_base_with_the_adapter_off(tmp_path, sft_policy):
    final = ppo.train(cfg_for(tmp_path, sft_policy, advantage="rloo", iterations=2, lora=True, lora_r=4))
    kls = logged(tmp_path / "out", "ppo/kl")
    assert kls[0] == 0.0 and kls[1] != 0.0  # the adapter starts as the identity, then moves
    assert final["train/iterations"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_reward_model_scores_and_initialises_the_critic(tmp_path, sft_policy):
    from accelerate.state import AcceleratorState

    rm_cfg = reward.RMConfig(model="tiny-llama", data="sample:pairs", output=str(tmp_path / "rm"), max_steps=2,
                             batch_size=4, lr=1e-3, val_fraction=0.0, dtype="fp32", max_length=128)
    reward.train(rm_cfg)
    # the critic starts on the rewards' scale: its head reads (raw − offset)·scale, the RM's normalised score
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.algos.ppo_setup import normalised_head

    raw = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    offset, scale = raw.config.rlhfkit_reward_offset, raw.config.rlhfkit_reward_scale
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    normalised_head(critic)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        assert offset != 0 and critic(ids).logits.item() == pytest.approx((raw(ids).logits.item() - offset) * scale,
                                                                          abs=1e-5)
    AcceleratorState._reset_state(reset_partial_state=True)
    final = ppo.train(cfg_for(tmp_path, sft_policy, reward_fn=None, reward_model=str(tmp_path / "rm"),
                              advantage="gae", n_samples=1, iterations=1,
                              monitor=["rm:" + str(tmp_path / "rm"), REWARD_FN]))
    assert final["ppo/critic_init"] == "rm" and math.isfinite(final["ppo/score"])
    # monitors are logged, not optimised: the same RM as monitor reads the same score; the function its own
    assert final["monitor/rm_rm"] == pytest.approx(final["ppo/score"], abs=1e-5)
    assert 0 <= final["monitor/a_fraction"] <= 1


@pytest.mark.parametrize("kw,msg", [({"advantage": "grpo", "n_samples": 1}, "--n-samples ≥ 2"),
                                    ({"reward_fn": None}, "give --reward-model, --reward-fn or both"),
                                    ({"advantage": "rloo", "critic_warmup": 2}, "need --advantage gae"),
                                    ({"critic_warmup": 10}, "fewer than --iterations 10"),
                                    ({"critic_warmup": 2, "sharding": "zero2"}, "use ddp or fsdp2"),
                                    ({"advantage": "ppo2"}, "expected one of gae, grpo, rloo, reinforce++"),
                                    ({"sharding": "fsdp2", "lora": True, "merge": True}, "--merge with --sharding fsdp2"),
                                    ({"sharding": "zero9"}, "--sharding 'zero9': expected one of ddp, fsdp2"),
                                    ({"sharding": "zero3"}, "ppo does not run with --sharding zero3"),
                                    ({"shard_frozen": True}, "--shard-frozen shards with FSDP2"),
                                    ({"engine": "vlm"}, "--engine 'vlm': expected one of auto, hf, vllm"),
                                    ({"engine": "hf", "rollout_correction": "token-tis"},
                                     "nothing to correct"),
                                    ({"rollout_correction": "tis"}, "expected auto, none, token-tis, seq-mask")])
def test_config_errors(tmp_path, kw, msg):
    with pytest.raises(UsageError, match=msg):
        ppo.train(cfg_for(tmp_path, "tiny-llama", **kw))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_one_clear_line(tmp_path):
    proc = run_cli("ppo", "--policy", "tiny-llama", "--reward-fn", REWARD_FN, "--engine", "vllm",
                   "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "--engine vllm: vLLM is not installed here; scripts/setup --with vllm" in \
        proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def two_prompts_rollout(lm, tok) -> ppo.Rollout:
    """Three samples of each of two prompts of different lengths (one with a system turn), ragged responses."""
    from rlhfkit.rollout import SamplingParams
    from rlhfkit.rollout.hf import HFEngine

    prompts = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours?"}]]
    samples = HFEngine(lm, tok, 8).generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=6))
    input_ids, attention_mask = samples.sequences()
    return ppo.Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_index=samples.prompt_index,
                       pad_id=tok.pad_token_id, response_mask=samples.response_mask.float(), logprobs=None,
                       ref_logprobs=None, values=None, scores=torch.zeros(6))


def test_shared_prompt_forwards_give_the_whole_sequences_logprobs_values_and_gradients(tok, sft_policy):
    # rows of the same prompt run it once (`shared_prefix`): log-probs, entropies, values and gradients must be
    # those of the whole sequences, with prompts of different lengths and ragged responses
    from transformers import AutoModelForSequenceClassification

    lm = models.load_causal_lm(sft_policy, tokenizer=tok).eval()
    rollout = two_prompts_rollout(lm, tok)
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    assert ppo.model_inputs(rollout, True).prefix is not None and ppo.model_inputs(rollout, False).prefix is None
    assert len(ppo.model_inputs(rollout, True).prefix.ids) == 2  # two prompts, each run once
    assert ppo.model_inputs(rollout, True).prefix.root > 0  # on their common start (the template's), run once
    actor = forward.SelectedLogits(lm)
    critic = forward.ValueModel(AutoModelForSequenceClassification.from_config(
        models.tiny_llama_config(len(tok), num_labels=1), dtype=torch.float32)).eval()
    results = []
    for share in (False, True):
        actor.zero_grad()
        critic.zero_grad()
        logps, entropy = ppo.token_logprobs(actor, rollout, 0.7, with_entropy=True, share=share)
        values = ppo.token_values(critic, rollout, share)
        (logps.sum() + entropy.sum() + values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in [*actor.named_parameters(), *critic.named_parameters()]}
        results.append((logps.detach(), entropy.detach(), values.detach(), grads))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    g0, g1 = results[0][3], results[1][3]
    for n in g0:  # tolerance relative to each tensor's largest entry: the two paths round differently
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()), msg=n)
    # a rollout is padded to its widest prompt and response; the model inputs drop the padding: three more
    # padding columns on each side change nothing, and the results keep the rollout's width
    wide = replace(rollout, input_ids=torch.nn.functional.pad(input_ids, (3, 3), value=tok.pad_token_id),
                   attention_mask=torch.nn.functional.pad(attention_mask, (3, 3)),
                   response_mask=torch.nn.functional.pad(rollout.response_mask, (0, 3)))
    assert ppo.model_inputs(wide, False).input_ids.shape == ppo.model_inputs(rollout, False).input_ids.shape
    for share in (False, True):
        logps = ppo.token_logprobs(actor, wide, 0.7, share=share)[0]
        assert logps.shape == wide.response_mask.shape
        torch.testing.assert_close(logps[:, :-3], results[int(share)][0], rtol=1e-5, atol=1e-5)


def test_forwards_from_the_shared_blocks_hidden_states_give_the_whole_forwards_results(tok, sft_policy):
    # --freeze-layers 1: the reference's block 0 is the actor's, run once (`hidden_states`); the actor, the reference
    # and the critic (its own block 0) start at block 1 from the kept hidden states, with and without shared prompts:
    # log-probs, entropies, values and the trained blocks' gradients must be the whole forwards'
    from transformers import AutoModelForSequenceClassification

    lm = models.load_causal_lm(sft_policy, tokenizer=tok).eval()
    models.freeze_layers(lm, 1)
    ref = forward.SelectedLogits(models.load_causal_lm(sft_policy, tokenizer=tok)).eval().requires_grad_(False)
    rollout = two_prompts_rollout(lm, tok)
    actor = forward.SelectedLogits(lm)
    critic_lm = AutoModelForSequenceClassification.from_config(
        models.tiny_llama_config(len(tok), num_labels=1), dtype=torch.float32).eval()
    models.freeze_layers(critic_lm, 1)
    critic = forward.ValueModel(critic_lm)
    length = int(rollout.attention_mask.sum(1).max())
    for share in (False, True):
        results = []
        for kept in (False, True):
            batch = rollout
            if kept:
                with torch.no_grad():
                    batch = replace(rollout, shared_blocks=1,
                                    actor_hidden=ppo.hidden_states(ref, rollout, 1, length, share),
                                    critic_hidden=ppo.hidden_states(critic, rollout, 1, length, share))
            actor.zero_grad()
            critic.zero_grad()
            logps, entropy = ppo.token_logprobs(actor, batch, 0.7, with_entropy=True, share=share)
            values = ppo.token_values(critic, batch, share)
            (logps.sum() + entropy.sum() + values.sum()).backward()
            with torch.no_grad():
                ref_logps = ppo.token_logprobs(ref, batch, 0.7, share=share)[0]
            grads = {n: p.grad.clone() for n, p in [*actor.named_parameters(), *critic.named_parameters()]
                     if p.requires_grad}
            results.append((logps.detach(), entropy.detach(), values.detach(), ref_logps, grads))
        for a, b in zip(results[0][:4], results[1][:4]):
            assert a.abs().sum() > 0
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        g0, g1 = results[0][4], results[1][4]
        assert any(".layers.1." in n for n in g0) and not any(".layers.0." in n for n in g0)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()), msg=n)


def test_a_run_on_the_shared_blocks_is_the_run_without_them(tmp_path, sft_policy):
    # the preset's GAE with frozen blocks, three iterations, prompts shared, micro-batches of 3 rows: the frozen
    # block runs once per iteration for actor and reference and once for the critic, and the run is the same
    base = cfg_for(tmp_path, sft_policy, advantage="gae", iterations=3, freeze_layers=1, rollout_prompts=4,
                   minibatch_size=8, batch_size=3)
    ppo.train(replace(base, output=str(tmp_path / "on")))
    ppo.train(replace(base, output=str(tmp_path / "off"), shared_blocks=False))
    assert min(logged(tmp_path / "on", "time/shared_blocks")) > 0
    assert logged(tmp_path / "off", "time/shared_blocks") == []
    for key in ["ppo/score", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/explained_variance"]:
        on, off = logged(tmp_path / "on", key), logged(tmp_path / "off", key)
        assert on == pytest.approx(off, rel=1e-4, abs=1e-6), key
    assert max(logged(tmp_path / "on", "ppo/kl")) > 0  # the policy moved
    a, b = load_file(tmp_path / "on" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_minibatches_hold_whole_prompt_groups(tmp_path, sft_policy, monkeypatch):
    # 4 prompts × 4 samples in minibatches of 8: each minibatch is two whole prompt groups
    seen = []
    real = ppo.minibatch_loss
    monkeypatch.setattr(ppo, "minibatch_loss", lambda net, mb, *a: seen.append(mb) or real(net, mb, *a))
    ppo.train(cfg_for(tmp_path, sft_policy, advantage="rloo", iterations=1, rollout_prompts=4, minibatch_size=8,
                      batch_size=8))
    assert len(seen) == 2
    for mb in seen:
        width = mb.input_ids.shape[1] - mb.response_mask.shape[1]  # the prompt's (left-padded) width
        assert len({tuple(row[:width].tolist()) for row in mb.input_ids}) == 2


def test_missing_eos_notices_say_when_the_rule_leaves_little_or_no_signal():
    # the replace rule gives every unfinished response the same score: warn once when it hit most of a batch, and
    # say so every time it hit all of it (then the reward gives the iteration no learning signal)
    cfg = ppo.PPOConfig(policy="tiny-llama", reward_fn=REWARD_FN, max_new_tokens=8)
    some, most, none = (torch.tensor(f) for f in ([True, True, False, True], [False, False, True, False],
                                                  [False] * 4))
    assert ppo.missing_eos_notice(some, cfg, 1, warned=False) is None
    warning = ppo.missing_eos_notice(most, cfg, 2, warned=False)
    assert warning.startswith("warning: iteration 2: 3 of 4 responses did not end")
    assert "--max-new-tokens (now 8)" in warning
    assert ppo.missing_eos_notice(most, cfg, 3, warned=True) is None
    for warned in (False, True):
        assert "no learning signal" in ppo.missing_eos_notice(none, cfg, 4, warned)
    for other in (replace(cfg, missing_eos="subtract"), replace(cfg, missing_eos="none"),
                  replace(cfg, missing_eos_penalty=None)):
        assert ppo.missing_eos_notice(none, other, 4, warned=False) is None


def test_a_reward_function_that_raises_is_named_with_the_row(tmp_path):
    from rlhfkit.reward_fn import call_reward_fn, load_reward_fn

    fns = tmp_path / "fns.py"
    fns.write_text("def picky(prompts, responses, metadata):\n"
                   "    return [1.0 / len(r) for r in responses]\n")
    picky = load_reward_fn(f"{fns}:picky")
    prompts, meta = [[{"role": "user", "content": "hi"}]] * 3, [{}] * 3
    assert call_reward_fn(picky, "fns.py:picky", prompts, ["ab", "a", "abcd"], meta).tolist() == [0.5, 1.0, 0.25]
    with pytest.raises(UsageError, match=r"^--reward-fn fns.py:picky: raised ZeroDivisionError: float division by zero "
                                         r"on row 1 \(response ''\)$"):
        call_reward_fn(picky, "fns.py:picky", prompts, ["ab", "", "abcd"], meta)


def test_a_missing_reward_model_directory_is_one_line_before_anything_loads(tmp_path):
    proc = run_cli("ppo", "--policy", "tiny-llama", "--reward-model", str(tmp_path / "no-rm"), "--output",
                   str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and proc.stderr == f"error: reward model {tmp_path / 'no-rm'}: no such directory " \
        "(give the --output of `rlhfkit rm`)\n"


def test_prompts_longer_than_max_length_are_skipped_and_counted(tmp_path, tok, capsys):
    from rlhfkit.algos.ppo import PPOConfig, load_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi.", "id": 0}, {"prompt": "word " * 200, "id": 1},
                                               {"prompt": "Bye.", "id": 2}])
    prompts, metadata, _ = load_prompts(PPOConfig(prompts=path, max_length=100), tok)
    assert [m["id"] for m in metadata] == [0, 2] and [p[-1]["content"] for p in prompts] == ["Hi.", "Bye."]
    assert f"data: 1 of 3 prompts skipped, longer than --max-length 100 tokens (the first: {path}:2)" in \
        capsys.readouterr().out


def scored_rows(record: Path) -> list[list]:
    """Per reward call (one per iteration), the sorted (prompt, response) rows that every process scored."""
    calls = [[json.loads(line) for line in f.read_text().splitlines()] for f in sorted(record.glob("*.jsonl"))]
    return [sorted(row for rank in per_call for row in rank) for per_call in zip(*calls, strict=True)]


@pytest.mark.parametrize("advantage,sharding", [("gae", "ddp"), ("gae", "fsdp2"),
                                               pytest.param("gae", "zero2", marks=pytest.mark.slow),
                                               pytest.param("rloo", "ddp", marks=pytest.mark.slow)])
def test_two_processes_update_as_one(tmp_path, sft_policy, advantage, sharding):
    # 8 prompts × 2 samples, minibatches of 8 rows drawn across both processes' rows, micro-batches of 3: the
    # processes hold unequal parts of a minibatch; --scale-scores and the whitening need the whole batch; GAE's
    # run also takes PPO-ptx batches of 3 rows (2 + 1); 13 prompts, so the second iteration runs into the second
    # pass; with ddp and fsdp2 the first iteration trains GAE's critic alone. fsdp2: actor and critic sharded,
    # whole while sampling; zero2: their AdamW state split
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the number {i}."} for i in range(13)])
    args = ["ppo", "--policy", sft_policy, "--prompts", prompts, "--reward-fn", RECORDED_FN, "--advantage", advantage,
            "--iterations", "3", "--rollout-prompts", "8", "--n-samples", "2", "--minibatch-size", "8",
            "--batch-size", "3", "--ppo-epochs", "2", "--max-new-tokens", "8", "--dtype", "fp32", "--lr", "1e-3", "--critic-lr", "1e-3",
            "--missing-eos", "none", "--scale-scores", "--kl-coef", "0.01", "--seed", "1", "--sample-every", "0"]
    if advantage == "gae":
        args += ["--ptx-data", "sample:conversations", "--ptx-batch-size", "3"]
        args += ["--critic-warmup", "1"] if sharding != "zero2" else []  # refused there (ppo_setup.check)
    run_cli(*args, "--output", str(tmp_path / "one"), env={"RLHFKIT_TEST_RECORD": str(tmp_path / "rec-one")})
    run_distributed(2, *args, "--sharding", sharding, "--output", str(tmp_path / "two"),
                    env={"RLHFKIT_TEST_RECORD": str(tmp_path / "rec-two")})
    # the same rows sampled, each prompt's by one process: none twice, none skipped
    one, two = scored_rows(tmp_path / "rec-one"), scored_rows(tmp_path / "rec-two")
    assert len(one) == 3 and one == two
    assert len(list((tmp_path / "rec-two").glob("*.jsonl"))) == 2
    keys = ["ppo/score", "ppo/kl", "ppo/policy_loss", "ppo/entropy", "ppo/approx_kl", "ppo/clipfrac"]
    keys += ["ppo/value_loss", "ppo/ptx_loss"] if advantage == "gae" else []
    for key in keys:
        assert logged(tmp_path / "two", key) == pytest.approx(logged(tmp_path / "one", key), rel=1e-4, abs=1e-6), key
    assert logged(tmp_path / "one", "ppo/kl")[-1] > 0  # the policy moved
    held = {run: json.loads((tmp_path / run / "run.json").read_text())["bytes_per_process"] for run in ("one", "two")}
    for what in ("parameters", "optimizer"):  # actor and critic: whole on each process, or half where split
        split = sharding == "fsdp2" or (sharding, what) == ("zero2", "optimizer")
        assert held["two"][what] == pytest.approx(held["one"][what] / (2 if split else 1), rel=0.01), what
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:  # Adam's 1/sqrt(v) can move a weight whose gradient is ~0 by a fraction of an lr-sized step
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_sharded_frozen_models_give_the_replicated_result_in_half_the_bytes(tmp_path, sft_policy):
    # --shard-frozen: the reference and the reward model sharded over 2 processes (FSDP2), whole only for their
    # own passes; the run must be the one with both whole on every process
    from accelerate.state import AcceleratorState

    reward.train(reward.RMConfig(model="tiny-llama", data="sample:pairs", output=str(tmp_path / "rm"), max_steps=2,
                                 batch_size=4, lr=1e-3, val_fraction=0.0, dtype="fp32", max_length=128))
    AcceleratorState._reset_state(reset_partial_state=True)
    args = ["ppo", "--policy", sft_policy, "--reward-model", str(tmp_path / "rm"), "--advantage", "gae",
            "--iterations", "2", "--rollout-prompts", "4", "--n-samples", "2", "--minibatch-size", "4",
            "--max-new-tokens", "8", "--dtype", "fp32", "--lr", "1e-3", "--critic-lr", "1e-3", "--kl-coef", "0.1",
            "--sample-every", "0", "--sharding", "fsdp2"]
    run_distributed(2, *args, "--output", str(tmp_path / "whole"))
    run_distributed(2, *args, "--shard-frozen", "--output", str(tmp_path / "sharded"))
    for key in ["ppo/score", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"]:
        assert logged(tmp_path / "sharded", key) == pytest.approx(logged(tmp_path / "whole", key), rel=1e-5,
                                                                  abs=1e-7), key
    assert logged(tmp_path / "whole", "ppo/kl")[-1] > 0
    held = {run: json.loads((tmp_path / run / "run.json").read_text())["frozen_bytes_per_process"]
            for run in ("whole", "sharded")}
    assert held["sharded"] == pytest.approx(held["whole"] / 2, rel=0.01)  # the reference's and RM's weights
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "sharded"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_rollout_prompts_must_split_evenly_over_the_processes(tmp_path):
    proc = run_distributed(2, "ppo", "--policy", "tiny-llama", "--reward-fn", REWARD_FN, "--rollout-prompts", "3",
                           "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    assert "--rollout-prompts 3 must be a multiple of the 2 processes" in proc.stderr


@pytest.mark.slow  # the default run keeps the 2-process update test and the 1-process resume test
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_process_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, sft_policy, sharding):
    args = ["ppo", "--sharding", sharding, "--policy", sft_policy, "--reward-fn", REWARD_FN, "--advantage", "gae",
            "--iterations", "4",
            "--rollout-prompts", "4", "--n-samples", "2", "--minibatch-size", "4", "--max-new-tokens", "8",
            "--dtype", "fp32", "--lr", "1e-3", "--critic-lr", "1e-3", "--adaptive-kl", "--sample-every", "1",
            "--save-steps", "1"]
    run_distributed(2, *args, "--output", str(tmp_path / "straight"))
    out = tmp_path / "killed"
    launch_and_kill(2, [*args, "--output", str(out)], out / "checkpoints" / "step-0000002")
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    run_distributed(2, *args, "--output", str(out), "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged(out, "ppo/beta") == logged(tmp_path / "straight", "ppo/beta")
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_iterations_take_equal_batches_from_a_stream_of_passes():
    perm = lambda n, seed: torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    # 5 prompts, 4 per iteration, seed 7: the first pass's last prompt and the second pass's first three
    assert ppo.iteration_prompts(0, 5, 4, 7) == perm(5, 7)[:4]
    assert ppo.iteration_prompts(1, 5, 4, 7) == perm(5, 7)[4:] + perm(5, 8)[:3]
    assert ppo.iteration_prompts(2, 5, 4, 7) == perm(5, 8)[3:] + perm(5, 9)[:2]
    stream = [i for it in range(5) for i in ppo.iteration_prompts(it, 5, 4, 7)]  # 20 = 4 whole passes
    assert all(sorted(stream[k:k + 5]) == list(range(5)) for k in range(0, 20, 5))
    # fewer prompts than a batch: whole passes, then the start of the next
    assert ppo.iteration_prompts(0, 3, 7, 0) == perm(3, 0) + perm(3, 1) + perm(3, 2)[:1]
