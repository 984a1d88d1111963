"""`rlhfkit plan`: parameter counts and memory rules worked out by hand, and published RLHF set-ups that did (or did
not) fit, and how long they took, checked against the planner under the settings their authors state."""

from __future__ import annotations

import json

import pytest

from rlhfkit import UsageError, cli
from rlhfkit.plan import ARCHS, PlanConfig, Role, plan, resolve_model, role_memory

GIB = 2**30


def run(**kw) -> dict:
    return plan(PlanConfig(**kw))


def test_parameter_count_of_a_tiny_config_json_by_hand(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False}))
    # head_dim 16: q and o 64×64 each, k and v 64×32 each = 4096 + 4096 + 2048 + 2048 = 12288;
    # gated MLP 3 × 64 × 128 = 24576; two RMSNorms 2 × 64 = 128  →  36992 per layer, 73984 for 2;
    # embeddings 100 × 64 = 6400, untied lm_head 6400, final norm 64  →  73984 + 12864 = 86848
    for where in (tmp_path, tmp_path / "config.json"):  # the directory, or the file itself
        label, arch = resolve_model("policy", str(where))
        assert arch.params() == 86848 and label.endswith("config.json")
    # K and V, 2 layers, 2 KV heads of 16, bf16: 2 × 2 × 2 × 16 × 2 = 256 bytes per token
    assert arch.kv_bytes() == 256
    out = run(policy=str(tmp_path), gpus=1, max_length=16, max_new_tokens=16, rollout_prompts=4)
    assert out["fits"] and out["roles"]["actor"]["gpus"] == 1


def test_known_parameter_counts():
    # the totals the Hugging Face hub shows from each checkpoint's weights
    assert ARCHS["llama-3-8b"].params() == 8_030_261_248
    assert ARCHS["llama-3-70b"].params() == 70_553_706_496
    assert ARCHS["qwen2.5-7b"].params() == 7_615_616_512  # q/k/v biases included
    # OPT-350m (post-LN, no final norm, 512-wide embeddings projected to 1024): 50272·512 + 2050·1024 positions
    # + 2·512·1024 projections + 24 × 12,596,224 per layer = 331,196,416
    assert ARCHS["opt-350m"].params() == 331_196_416


def test_kv_cache_bytes_per_token_for_llama_3_8b():
    # 32 layers × 8 KV heads × 128 dims × 2 (K and V) × 2 bytes (bf16); TP2 splits the heads
    assert ARCHS["llama-3-8b"].kv_bytes() == 32 * 8 * 128 * 2 * 2 == 131072
    assert ARCHS["llama-3-8b"].kv_bytes(tp=2) == 65536


def test_sixteen_bytes_per_parameter_whole_with_ddp_and_an_eighth_with_zero3():
    n = 1_000_000_000
    actor = Role("actor", "x", ARCHS["llama-3-8b"], n, trained=True, lora=0, logits=True)
    states = lambda m: m["weights"] + m["grads"] + m["optimizer"]  # noqa: E731
    ddp = role_memory(actor, 8, PlanConfig(sharding="ddp"))
    assert (ddp["weights"], ddp["grads"], ddp["optimizer"]) == (2 * n, 2 * n, 12 * n)  # ZeRO paper §3: 2 + 2 + 12
    assert states(role_memory(actor, 8, PlanConfig(sharding="zero3"))) == 16 * n / 8
    zero1 = role_memory(actor, 8, PlanConfig(sharding="zero1"))
    assert states(zero1) == 2 * n + 2 * n + 12 * n / 8
    fsdp2 = role_memory(actor, 8, PlanConfig(sharding="fsdp2"))
    assert (fsdp2["weights"], fsdp2["grads"], fsdp2["optimizer"]) == (4 * n / 8, 4 * n / 8, 8 * n / 8)
    offloaded = role_memory(actor, 8, PlanConfig(sharding="zero3", offload="optimizer"))
    assert states(offloaded) == 2 * n / 8


@pytest.mark.parametrize(("key", "value", "flag"), [("gpu", "v100", "--gpu"), ("policy", "7q", "--policy"),
                                                     ("critic", "13x", "--critic"),
                                                     ("colocate", "actor+ref", "--colocate"),
                                                     ("sharding", "zero4", "--sharding")])
def test_bad_input_is_a_usage_error_naming_the_key(key, value, flag):
    with pytest.raises(UsageError, match=f"^{flag} "):
        run(**{key: value})


def test_pool_counts_must_add_up():
    with pytest.raises(UsageError, match="--gpus 8"):
        run(colocate="none", actor_gpus=8, critic_gpus=8, ref_gpus=4, reward_gpus=4, rollout_gpus=8)
    with pytest.raises(UsageError, match="--critic-gpus 2: there is no critic"):
        run(critic="none", colocate="none", critic_gpus=2)
    with pytest.raises(UsageError, match="--rollout-tp 3"):
        run(rollout_tp=3)


def test_sizes_map_to_the_nearest_llama_family_architecture():
    assert resolve_model("policy", "7b")[0] == "qwen2.5-7b"
    assert resolve_model("policy", "70b")[0] == "llama-3-70b"
    label, arch = resolve_model("policy", "3b")  # no known model within 30%: a generic llama shape
    assert label.startswith("generic") and abs(arch.params() / 3e9 - 1) < 0.1


def test_uncounted_pools_share_the_gpus_2_2_1_1_2():
    out = run(colocate="none", gpus=16)
    assert {k: v["gpus"] for k, v in out["roles"].items()} == {"actor": 4, "critic": 4, "ref": 2, "reward": 2,
                                                               "rollout": 4}


# OpenRLHF's Llama-3-70B PPO with a 70B reward model (examples/scripts/train_ppo_llama_ray_70b.sh, e.g. commit c250c21a,
# https://github.com/OpenRLHF/OpenRLHF/blob/c250c21a/examples/scripts/train_ppo_llama_ray_70b.sh; README: "full-scale
# fine-tuning of 70B+ models with multiple A100 80G GPUs and vLLM"; arXiv 2405.11143): actor 8, critic 8, ref 4,
# reward 4 GPUs, 4 vLLM engines × TP2; --zero_stage 3 --adam_offload --gradient_checkpointing --bf16,
# --micro_train_batch_size 1, --prompt_max_len 1024 --generate_max_len 1024, --rollout_batch_size 1024,
# --vllm_gpu_memory_utilization default 0.95 (openrlhf/cli/train_ppo_ray.py at that commit).
OPENRLHF_70B = dict(policy="llama-3-70b", reward_model="llama-3-70b", gpu="a100-80g", rollout_tp=2, sharding="zero3",
                    offload="optimizer", batch_size=1, max_length=1024, max_new_tokens=1024, rollout_prompts=1024,
                    gpu_memory_utilization=0.95)


def test_openrlhf_70b_fits_on_32_a100_80g_in_separate_pools_and_not_on_one_node():
    out = run(**OPENRLHF_70B, gpus=32, colocate="none", actor_gpus=8, critic_gpus=8, ref_gpus=4, reward_gpus=4,
              rollout_gpus=8)
    assert out["fits"], out["pools"]
    assert out["roles"]["rollout"]["concurrent"] >= 1  # a KV cache left beside 65.7 GiB of weights per GPU
    # one 8-GPU node with every role on every GPU: four 70B models' bf16 weights alone are 65 GiB per GPU, and the
    # engine's 0.95 × 80 GiB comes on top while it generates
    out = run(**OPENRLHF_70B, gpus=8, colocate="all")
    assert not out["fits"] and out["pools"][0]["peak_gib"] > 80


def test_verl_7b_actor_and_critic_with_an_8b_reward_model_fit_on_8_gpus_of_80_gb():
    # veRL examples/ppo_trainer/run_qwen2-7b_rm.sh (commit 4081d8af, April 2025,
    # https://github.com/volcengine/verl/blob/4081d8af1/examples/ppo_trainer/run_qwen2-7b_rm.sh): Qwen2-7B-Instruct actor
    # and critic, FsfairX-LLaMA3-RM-v0.1 (Llama-3-8B) reward model, everything on the same 8 GPUs (veRL's hybrid
    # engine), FSDP without param or optimizer offload, gradient checkpointing, vLLM TP1 at gpu_memory_utilization 0.6,
    # no reference (use_kl_loss=False, use_kl_in_reward=False), prompts 1024 + responses 512, train_batch_size 1024,
    # micro-batch 16 (the critic's 32 needs less than the actor's 16: no vocabulary logits). veRL's docs assume
    # 80 GB GPUs; the script's reward model is offloaded (param_offload=True) — kept on the GPU here, which costs more.
    for gpu in ("a100-80g", "h100-80g"):
        out = run(policy="qwen2.5-7b", reward_model="llama-3-8b", reference=False, gpu=gpu, gpus=8, colocate="all",
                  sharding="fsdp2", rollout_tp=1, gpu_memory_utilization=0.6, batch_size=16, max_length=1024,
                  max_new_tokens=512, rollout_prompts=1024)
        assert out["fits"], (gpu, out["pools"])


# DeepSpeed-Chat (https://github.com/microsoft/DeepSpeed/tree/master/blogs/deepspeed-chat, Table 3, "Max Model Size
# Supported by DeepSpeed-HE on a Single GPU": A100 40G: OPT-6.7B, A100 80G: OPT-13.2B; critic and reward OPT-350M).
# Their single-GPU step-3 scripts (applications/DeepSpeed-Chat/training/step3_rlhf_finetuning/training_scripts/
# single_gpu/run_6.7b.sh in microsoft/DeepSpeedExamples): ZeRO stage 0 for actor and critic, --actor_lora_dim 128
# (LoRA on the actor only), gradient checkpointing for both, per-device batch 8, prompt 256 + answer 256, the
# Hybrid Engine (generation on the actor's own weights: --engine hf), no reference offload.
DS_CHAT_1GPU = dict(critic="opt-350m", reward_model="opt-350m", gpus=1, colocate="all", engine="hf", sharding="ddp",
                    lora=True, lora_r=128, max_length=256, max_new_tokens=256, rollout_prompts=8, batch_size=8)


@pytest.mark.parametrize(("gpu", "largest", "next_size"), [("a100-80g", "opt-13b", "opt-30b"),
                                                           ("a100-40g", "opt-6.7b", "opt-13b")])
def test_deepspeed_chat_largest_actor_on_one_gpu(gpu, largest, next_size):
    assert run(policy=largest, gpu=gpu, **DS_CHAT_1GPU)["fits"]
    assert not run(policy=next_size, gpu=gpu, **DS_CHAT_1GPU)["fits"]


def test_deepspeed_chat_opt_13b_step_3_on_8_a100_80g_takes_about_9_hours():
    # DeepSpeed-Chat's Table 1 (same blog; applications/DeepSpeed-Chat/README.md, "Training Performance Evaluation"):
    # OPT-13.2B actor + OPT-350M critic/reward, 8× A100-80G, step 3: 9 hours, for one epoch of 135,317,504 tokens
    # (prompts 256 + answers 256; step3_rlhf_finetuning/BenckmarkSetting.md), global batch up to 1024 pairs. Settings of
    # training_scripts/single_node/run_13b.sh: ZeRO-3, --actor_lora_dim 128, gradient checkpointing, per-device batch
    # 16, Hybrid Engine with --inference_tp_size 2. The planner must land within a factor of 2: 4.5 h to 18 h.
    out = run(policy="opt-13b", critic="opt-350m", reward_model="opt-350m", gpu="a100-80g", gpus=8, colocate="all",
              engine="hf", rollout_tp=2, sharding="zero3", lora=True, lora_r=128, max_length=256, max_new_tokens=256,
              rollout_prompts=1024, batch_size=16, tokens=135_317_504)
    assert out["fits"]
    assert 4.5 <= out["hours_total"] <= 18, out


def test_cli_prints_a_table_then_the_json(capsys):
    assert cli.main(["plan", "--policy", "7b", "--gpu", "a100-80g", "--gpus", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.strip().startswith("GiB per GPU") for line in lines)
    result = json.loads(lines[-1])
    assert result["gpus"] == 8 and set(result["roles"]) == {"actor", "critic", "ref", "reward", "rollout"}
    assert cli.main(["plan", "--gpu", "v100"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpu 'v100'")
