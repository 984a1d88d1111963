"""DPO on the tiny model: parity with TRL, reference modes agree, learning, parameters change, resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import forward, models
from rlhfkit.algos import dpo
from rlhfkit.tracking import read_metrics
from rlhfkit.training import global_batch_rows

from tests.conftest import polite_pairs, rewind, run_cli, train_losses, write_jsonl


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory, tok) -> str:
    """A reference model different from the policy (seed 1 vs 0), so h ≠ 0 on the first batch."""
    d = tmp_path_factory.mktemp("ref")
    models.load_causal_lm("tiny-llama", seed=1, tokenizer=tok).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def base_cfg(tmp_path: Path, **kw) -> dpo.DPOConfig:
    defaults = dict(model="tiny-llama", data="sample:pairs", output=str(tmp_path / "out"), max_steps=3,
                    batch_size=4, lr=1e-3, val_fraction=0.0, warmup_ratio=0.0, dtype="fp32", max_length=256)
    defaults.update(kw)
    return dpo.DPOConfig(**defaults)


def first(run_dir: Path, key: str) -> float:
    return next(m[key] for m in read_metrics(run_dir) if key in m)


def test_first_batch_loss_and_rewards_equal_trls_dpo_trainer(tmp_path, tok, ref_dir):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM

    cfg = base_cfg(tmp_path, ref_model=ref_dir, ref_mode="copy", max_steps=1, beta=0.1)
    dpo.train(cfg)
    ours = {k: first(tmp_path / "out", k) for k in ("dpo/loss", "dpo/chosen_reward", "dpo/rejected_reward")}

    # the same first batch, token for token: TRL's collator takes prompt / completion ids
    pairs, _ = dpo.load_pairs(cfg.data, None, tok, cfg.max_length)
    batch = [pairs[i] for i in global_batch_rows(0, len(pairs), cfg.batch_size, cfg.seed)]

    def split(ex):
        start = ex.loss_mask.index(1)
        end = max(i for i, m in enumerate(ex.loss_mask) if m) + 1
        return ex.input_ids[:start], ex.input_ids[start:end]

    examples = []
    for p in batch:
        prompt, chosen = split(p.chosen)
        assert split(p.rejected)[0] == prompt
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": split(p.rejected)[1]})
    policy = models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok)
    policy.save_pretrained(tmp_path / "policy")
    placeholder = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                                               "chosen": [{"role": "assistant", "content": "a"}],
                                               "rejected": [{"role": "assistant", "content": "b"}]}])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=cfg.beta, per_device_train_batch_size=cfg.batch_size,
                         report_to=[], use_cpu=True, bf16=False, max_length=None)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
                             ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                             train_dataset=placeholder, processing_class=tok)
    trainer.model.eval()  # dropout off, as in rlhfkit; TRL then files its metrics under "eval"
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    logged = trainer._metrics["eval"]
    assert ours["dpo/loss"] == pytest.approx(trl_loss, abs=1e-5)
    assert ours["dpo/chosen_reward"] == pytest.approx(logged["rewards/chosen"][0], abs=1e-5)
    assert ours["dpo/rejected_reward"] == pytest.approx(logged["rewards/rejected"][0], abs=1e-5)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the reference differs from the policy: a real check


def test_precomputed_reference_gives_the_same_losses_as_a_frozen_copy(tmp_path, ref_dir):
    copy = base_cfg(tmp_path, output=str(tmp_path / "copy"), ref_model=ref_dir, ref_mode="copy")
    pre = replace(copy, output=str(tmp_path / "pre"), ref_mode="precomputed")
    dpo.train(copy)
    dpo.train(pre)
    assert (tmp_path / "pre" / "ref_logps.pt").is_file()
    assert train_losses(tmp_path / "pre") == pytest.approx(train_losses(tmp_path / "copy"), abs=1e-5)
    assert abs(train_losses(tmp_path / "pre")[0] - math.log(2)) > 1e-3


def test_lora_reference_is_the_base_with_the_adapter_off(tmp_path):
    final = dpo.train(base_cfg(tmp_path, lora=True, lora_r=4, lr=1e-2))
    assert final["dpo/ref_mode"] == "lora"
    # LoRA's B starts at zero, so at step 1 the policy is its base: h = 0 and the loss is ln 2 exactly
    assert first(tmp_path / "out", "dpo/loss") == pytest.approx(math.log(2), abs=1e-6)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_every_trainable_parameter_changes(tmp_path, tok):
    before = models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok).state_dict()
    dpo.train(base_cfg(tmp_path, max_steps=2))
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_learns_a_held_out_preference(tmp_path):
    data = write_jsonl(tmp_path / "polite.jsonl", polite_pairs(120))
    final = dpo.train(base_cfg(tmp_path, data=data, val_fraction=0.25, batch_size=8, lr=3e-3, max_steps=12,
                               schedule="constant", beta=0.5))
    # the reference is the initial policy, so held-out accuracy and margin start at 0
    assert final["val/accuracy"] >= 0.9 and final["val/margin"] > 0.5, final
    losses = train_losses(tmp_path / "out")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_two_plus_two_equals_four_bit_exact(tmp_path, group_by_length):
    straight = base_cfg(tmp_path, output=str(tmp_path / "straight"), max_steps=4, grad_accum=2, batch_size=2,
                        group_by_length=group_by_length)
    dpo.train(straight)
    split = replace(straight, output=str(tmp_path / "split"), save_steps=2)
    dpo.train(split)
    rewind(tmp_path / "split", 2)
    dpo.train(replace(split, resume=True))
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "split")[-2:] == train_losses(tmp_path / "straight")[2:]


def test_rankings_give_all_pairs_and_identical_pairs_are_counted(tmp_path, tok):
    rows = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    pairs, report = dpo.load_pairs(write_jsonl(tmp_path / "r.jsonl", rows[:1]), None, tok, 128)
    assert len(pairs) == 5  # C(4,2) = 6 minus the tie
    pairs, report = dpo.load_pairs(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "x",
                                                                       "rejected": "y"}, rows[1]]), None, tok, 128)
    assert len(pairs) == 1 and report.identical_pairs == 1
    # best_worst: one pair per ranking, its best (c) against its worst (b); a pair stays itself
    pairs = [p for name, data in (("bw.jsonl", rows[0]), ("bwp.jsonl", {"prompt": "q", "chosen": "x", "rejected": "y"}))
             for p in dpo.load_pairs(write_jsonl(tmp_path / name, [data]), None, tok, 128, which="best_worst")[0]]
    decoded = [(tok.decode([t for t, m in zip(p.chosen.input_ids, p.chosen.loss_mask) if m]),
                tok.decode([t for t, m in zip(p.rejected.input_ids, p.rejected.loss_mask) if m])) for p in pairs]
    assert decoded == [("c<|im_end|>", "b<|im_end|>"), ("x<|im_end|>", "y<|im_end|>")]
    proc = run_cli("dpo", "--model", "tiny-llama", "--output", str(tmp_path / "x"), "--ranking-pairs", "best",
                   check=False)
    assert proc.returncode == 2 and "--ranking-pairs 'best': expected all or best_worst" in proc.stderr


def test_response_mask_excludes_earlier_assistant_turns(tmp_path, tok):
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
           "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"}
    (pair,), _ = dpo.load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row]), None, tok, 128)
    trained = [t for t, m in zip(pair.chosen.input_ids, pair.chosen.loss_mask) if m]
    assert tok.decode(trained) == "good<|im_end|>"


def test_cli_ipo_and_bad_loss(tmp_path):
    run_cli("dpo", "--model", "tiny-llama", "--output", str(tmp_path / "ipo"), "--loss", "ipo", "--max-steps", "1",
            "--dtype", "fp32", "--max-length", "128")
    # h = 0 at step 1 up to fp32 rounding: the reference log-probs come from a separate pass over other batch
    # shapes, which may take other kernels or thread splits; h came out at -5e-5 on an H100, and at 4e-6 once on a
    # 2-core CPU where nine other runs stayed within the old check (loss within 1e-6 relative). |h| ≤ 1e-4 moves
    # the loss (1/(2β) - h)² by at most 1e-3
    assert first(tmp_path / "ipo", "dpo/loss") == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-3)
    proc = run_cli("dpo", "--model", "tiny-llama", "--output", str(tmp_path / "x"), "--loss", "hinge", check=False)
    assert proc.returncode != 0 and "expected one of sigmoid, ipo" in proc.stderr and "Traceback" not in proc.stderr


def test_shared_prefix_gives_the_whole_sequences_logps_and_gradients(tmp_path, tok):
    # chosen and rejected run on one KV cache of their prompt (`shared_prefix`, on by default): the summed
    # response log-probs and every parameter's gradient must be those of the two whole sequences
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "A pear, I think, or a plum"},
        {"prompt": "Describe the autumn sky at dusk, in one short sentence please.", "chosen": "It glows orange.",
         "rejected": "It glows"}])
    pairs, _ = dpo.load_pairs(data, None, tok, 256)
    # shared: the prompt, up to the position whose logit predicts the first response token
    cuts = forward.shared_cuts([p.chosen for p in pairs] + [p.rejected for p in pairs], [0, 1, 0, 1])
    assert cuts == {k: p.chosen.loss_mask.index(1) - 1 for k, p in enumerate(pairs)}
    rows = forward.rows([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id, [0, 1, 0, 1])
    assert rows.prefix.root > 0  # the two prompts' common start (the chat template's) runs once
    net = forward.SelectedLogits(models.load_causal_lm("tiny-llama", seed=2, tokenizer=tok)).eval()
    results = []
    for share in (False, True):
        net.zero_grad()
        chosen, rejected = dpo.concatenated_logps(net, pairs, tok.pad_token_id, torch.device("cpu"), share)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (c0, r0, g0), (c1, r1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-4)
    for n in g0:  # tolerance relative to each tensor's largest entry: the two paths round differently
        assert g0[n].abs().max() > 0, n
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()), msg=n)
