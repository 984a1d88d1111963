"""Reward model on the tiny model: pooling, padding, K-way batching, data checks, learning, resume, score parity."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import DataError, forward, models
from rlhfkit import reward_model
from rlhfkit.algos import reward
from rlhfkit.data import chat, formats, messages
from rlhfkit.data.io import Row
from rlhfkit.tracking import read_metrics

from tests.conftest import BF16, polite_pairs, rewind, run_accelerate, run_cli, train_losses, write_jsonl


@pytest.fixture(scope="module")
def rm_tok():
    tok = models.load_tokenizer("tiny-llama")
    reward_model.set_reward_pad_token(tok)
    return tok


def base_cfg(tmp_path: Path, **kw) -> reward.RMConfig:
    defaults = dict(model="tiny-llama", data="sample:rankings", output=str(tmp_path / "out"), max_steps=4,
                    batch_size=4, lr=1e-3, val_fraction=0.0, warmup_ratio=0.0, dtype="fp32", max_length=256)
    defaults.update(kw)
    return reward.RMConfig(**defaults)


# --- pooling, padding, batching ---------------------------------------------------------------------------


def test_pad_token_is_never_written_by_the_template(rm_tok):
    """SmolLM2 pads with <|im_end|> (= eos); the RM pads with <|endoftext|>, which no rendering contains."""
    assert rm_tok.pad_token == "<|endoftext|>" and rm_tok.pad_token_id == 0 != rm_tok.eos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, full_length = reward_model.encode(rm_tok, msgs, 512, "x")
    assert rm_tok.pad_token_id not in ids and full_length == len(ids)
    assert ids == chat.encode(rm_tok, rm_tok.apply_chat_template(msgs, tokenize=False))  # pooled: the last one


def test_each_response_scored_once_and_k_way_prompts_weigh_the_same(rm_tok):
    """Prompt A ranks 3 responses [0, 1, 2] with scores 2, 1, 0: pairs (0,1) (0,2) (1,2), differences 1, 2, 1,
    loss_A = (2·softplus(−1) + softplus(−2)) / 3. Prompt B is a pair with margin 0.5 and scores 0, 1:
    loss_B = −log σ(0 − 1 − 0.5) = softplus(1.5). The batch holds 5 sequences, and the sum is loss_A + loss_B."""
    a = reward.EncodedPreference([[5], [6, 7], [8]], [(0, 1), (0, 2), (1, 2)], None, [1, 2, 1], "a")
    b = reward.EncodedPreference([[9], [10]], [(0, 1)], 0.5, [1, 1], "b")
    batch = reward.collate_preferences([a, b], rm_tok.pad_token_id)
    assert batch.sequences.input_ids.shape == (5, 2) and batch.sequences.attention_mask.sum() == 6
    assert batch.groups == [[(0, 1), (0, 2), (1, 2)], [(3, 4)]]
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    expected = (2 * sp(-1) + sp(-2)) / 3 + sp(1.5)
    assert reward.preference_loss_sum(scores, batch).item() == pytest.approx(expected, rel=1e-6)


def test_identical_pairs_are_counted_and_skipped_and_ties_give_no_pair(rm_tok):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "responses": ["a", "a", "b"], "ranking": [0, 1, 2]},
            {"prompt": "r", "responses": ["a", "b"], "ranking": [[0, 1]]}]
    fmts = ["pairs", "rankings", "rankings"]
    prefs = [formats.to_preference(Row(r, f"f:{i}"), f) for i, (r, f) in enumerate(zip(rows, fmts), 1)]
    encoded, report = reward.encode_preferences(rm_tok, prefs, 512)
    assert report.identical_pairs == 2  # the pair row and (0, 1) of the ranking
    assert report.skipped_no_pairs == 2  # the pair row and the all-tied ranking
    assert len(encoded) == 1 and encoded[0].pairs == [(0, 2), (1, 2)]


def test_truncation_keeps_the_prompt_start_and_is_counted(rm_tok):
    pref = formats.to_preference(Row({"prompt": "hi", "chosen": "word " * 200, "rejected": "no"}, "f:1"), "pairs")
    encoded, report = reward.encode_preferences(rm_tok, [pref], 64)
    assert report.truncated == 1 and len(encoded[0].input_ids[0]) == 64
    assert encoded[0].response_lengths[0] > 64  # the length bucket sees the real length


def test_invalid_ranking_is_an_error_naming_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]},
                                                  {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: ranking index 2 is out of range"):
        formats.read(data, formats.to_preference)


# --- training ----------------------------------------------------------------------------------------------


def test_every_trainable_parameter_changes(tmp_path, rm_tok):
    cfg = base_cfg(tmp_path, max_steps=2, normalize=False)
    before = {k: v.clone() for k, v in reward.build_model(cfg, rm_tok).state_dict().items()}
    reward.train(cfg)
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_learns_a_rule_to_90_percent_held_out_accuracy(tmp_path):
    data = write_jsonl(tmp_path / "polite.jsonl", polite_pairs(200))
    final = reward.train(base_cfg(tmp_path, data=data, val_fraction=0.2, batch_size=8, lr=3e-3, max_steps=12,
                                  schedule="constant"))
    assert final["rm/accuracy"] >= 0.9, final
    assert final["rm/pairs"] == 40  # ECE by hand: tests/evaluate/test_calibration.py
    assert (tmp_path / "out" / "reliability.png").is_file()
    losses = train_losses(tmp_path / "out")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_two_plus_two_equals_four_bit_exact(tmp_path, group_by_length):
    straight = base_cfg(tmp_path, output=str(tmp_path / "straight"), grad_accum=2, batch_size=2,
                        group_by_length=group_by_length)
    reward.train(straight)
    split = replace(straight, output=str(tmp_path / "split"), save_steps=2)
    reward.train(split)
    rewind(tmp_path / "split", 2)
    reward.train(replace(split, resume=True))
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = train_losses(tmp_path / "straight")
    lb = train_losses(tmp_path / "split")
    assert lb[-2:] == la[2:]


def test_pmp_phase_runs_first_with_its_own_learning_rate(tmp_path):
    cfg = base_cfg(tmp_path, data="sample:pairs", pmp_data="sample:rankings", pmp_lr=5e-4, lr=1e-3, max_steps=2,
                   batch_size=16, normalize=False)
    final = reward.train(cfg)
    logged = [m for m in read_metrics(tmp_path / "out") if "train/loss" in m]
    assert [m["train/phase"] for m in logged] == [0, 0, 1, 1]  # 25 ranking prompts / 16 = 2 PMP steps
    assert logged[0]["train/lr"] == pytest.approx(5e-4) and logged[2]["train/lr"] == pytest.approx(1e-3)
    assert final["train/steps"] == 4


def test_resume_at_the_pmp_boundary_is_bit_exact(tmp_path):
    """A checkpoint written at the last PMP step holds the PMP optimizer; the main phase starts a fresh one."""
    cfg = base_cfg(tmp_path, output=str(tmp_path / "a"), data="sample:pairs", pmp_data="sample:rankings",
                   pmp_lr=5e-4, batch_size=16, max_steps=2, normalize=False)
    reward.train(cfg)
    split = replace(cfg, output=str(tmp_path / "b"), save_steps=1, save_total_limit=5)
    reward.train(split)
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-0000002")
    reward.train(replace(split, resume=True))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_the_adapter_and_the_score_head_and_merges(tmp_path, rm_tok):
    cfg = base_cfg(tmp_path, max_steps=2, lora=True, lora_r=4, merge=True, normalize=False)
    head = reward.build_model(replace(cfg, lora=False), rm_tok).score.weight.clone()
    reward.train(cfg)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    assert not torch.equal(adapter["base_model.model.score.weight"], head)
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "merged")
    assert torch.equal(merged.score.weight, adapter["base_model.model.score.weight"])


# --- normalisation, saving, rlhfkit score -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "out"
    reward.train(base_cfg(out.parent, output=str(out), data="sample:pairs", max_steps=3, normalize_std=True,
                          val_fraction=0.25, fit_temperature=True))
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    return out


def plain_transformers_scores(rm_dir: Path, conversations: list[list[dict]]) -> list[float]:
    """What a user without rlhfkit gets: the chat template, the tokenizer and the model, one row at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    out = []
    with torch.no_grad():
        for msgs in conversations:
            enc = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt", add_special_tokens=False)
            out.append(model(**enc).logits[0, 0].item())
    return out


def test_saved_model_records_normalisation_that_centres_the_chosen_responses(trained_rm, rm_tok):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(trained_rm).num_labels == 1
    config = json.loads((trained_rm / "config.json").read_text())
    assert config["pad_token_id"] == rm_tok.pad_token_id
    run = json.loads((trained_rm / "run.json").read_text())["final_metrics"]
    offset, scale = config["rlhfkit_reward_offset"], config["rlhfkit_reward_scale"]
    assert offset == run["rm/norm_offset"] and scale == run["rm/norm_scale"]
    assert config["rlhfkit_reward_temperature"] == run["rm/temperature"] > 0
    # the reference set: the chosen response of every training prompt (30 of the 40 after the 25% split)
    prefs = formats.read("sample:pairs", formats.to_preference)[0]
    train_prefs, _ = reward.split_validation(prefs, 0.25, 0)
    raw = torch.tensor(plain_transformers_scores(trained_rm, [p.prompt + p.responses[0] for p in train_prefs]))
    normalised = (raw - offset) * scale
    assert abs(normalised.mean().item()) < 1e-4
    assert normalised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_score_matches_plain_transformers(tmp_path, trained_rm):
    rows = [{"prompt": "What is 2+2?", "response": "4."},
            {"prompt": "Name a colour.", "response": "Blue, like the sky on a clear day in summer."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "response": "Hello!"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_cli("score", "--reward-model", str(trained_rm), "--data", data, "--output", str(tmp_path / "raw.jsonl"),
            "--normalize", "false", "--batch-size", "2")
    run_cli("score", "--reward-model", str(trained_rm), "--data", data, "--output", str(tmp_path / "norm.jsonl"))
    raw = [json.loads(x) for x in (tmp_path / "raw.jsonl").read_text().splitlines()]
    norm = [json.loads(x) for x in (tmp_path / "norm.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in raw] == rows  # every column kept, in order
    convs = [messages.as_messages(r["prompt"], "", "prompt") + [{"role": "assistant", "content": r["response"]}]
             for r in rows]
    plain = plain_transformers_scores(trained_rm, convs)
    assert [r["reward"] for r in raw] == pytest.approx(plain, abs=1e-4)
    config = json.loads((trained_rm / "config.json").read_text())
    expected = [(p - config["rlhfkit_reward_offset"]) * config["rlhfkit_reward_scale"] for p in plain]
    assert [r["reward"] for r in norm] == pytest.approx(expected, abs=1e-4)


def test_cli_rm_error_is_one_clear_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}])
    proc = run_cli("rm", "--model", "tiny-llama", "--data", data, "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "bad.jsonl:1: ranking repeats an index" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the default run keeps SFT's 2-process test (the same data-parallel plumbing)
def test_two_process_data_parallel_matches_one_process(tmp_path):
    # 9 prompts, global batch 4: the third step has one prompt, so the second process gets none (weight 0)
    data = write_jsonl(tmp_path / "nine.jsonl", polite_pairs(9, seed=3))
    common = ["--model", "tiny-llama", "--data", data, "--max-steps", "3", "--lr", "1e-3", "--dtype", "fp32",
              "--val-fraction", "0", "--max-length", "128", "--warmup-ratio", "0", "--normalize", "false"]
    run_cli("rm", *common, "--batch-size", "4", "--output", str(tmp_path / "one"))
    run_accelerate(2, "rm", *common, "--batch-size", "2", "--output", str(tmp_path / "two"))
    assert train_losses(tmp_path / "one") == pytest.approx(train_losses(tmp_path / "two"), rel=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:  # tolerance as in the SFT test: Adam magnifies rounding where a gradient is ~0
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    tokens = [m["train/tokens"] for m in read_metrics(tmp_path / "one") if "train/tokens" in m]
    assert tokens == [m["train/tokens"] for m in read_metrics(tmp_path / "two") if "train/tokens" in m]


@pytest.mark.parametrize("precision", ["no", BF16])
def test_scores_with_shared_prefixes_equal_scoring_each_sequence_whole(rm_tok, tmp_path, precision):
    # best-of-n and PPO score n samples per prompt: the prompt is run once into a KV cache; the scores must be
    # the plain path's (transformers' pooled forward over each whole sequence)
    from rlhfkit.reward_model import RewardModel, parts, score_sequences

    model = reward.build_model(base_cfg(tmp_path, seed=3), rm_tok).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a non-trivial head
    rm = RewardModel(model, rm_tok, offset=0.0, scale=1.0)
    p1 = [{"role": "user", "content": "Name three fruits, please."}]
    p2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    p3 = [{"role": "user", "content": "A much longer question about the colour of the autumn sky at dusk?"}]
    prompts = [p1] * 3 + [p2] + [p3] * 4 + [p1] * 2  # groups of 3, 1, 4 and 2 (p1 again, as a new prompt)
    groups = [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    responses = ["apple, pear, plum", "kiwi", "Banana bread is not a fruit but here goes nothing at all.", "Hello",
                 "Blue.", "Orange and pink, then grey.", "Blue", "Dark", "x", "fig fig fig"]
    # parts of whole groups, a group larger than a part alone
    assert parts([[0]] * 10, groups, 6) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert parts([[0]] * 10, groups, 2) == [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]
    assert parts([[0] * n for n in (3, 1, 2)], None, 2) == [[1, 2], [0]]  # without groups: by length
    seqs = [reward_model.encode(rm_tok, p + [{"role": "assistant", "content": r}], 256, "t")[0]
            for p, r in zip(prompts, responses)]
    cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    whole = score_sequences(model, seqs, rm_tok.pad_token_id, 4, cast)
    # a reward model loaded for scoring stores its blocks in the autocast dtype (`models.inference_weights`)
    stored = copy.deepcopy(model)
    models.inference_weights(stored, precision)
    rm_stored = RewardModel(stored, rm_tok, offset=0.0, scale=1.0, precision=precision)
    for batch_size in (2, 5, 64):  # runs split over batches, several runs per batch, one batch
        shared = score_sequences(model, seqs, rm_tok.pad_token_id, batch_size, cast, groups)
        assert torch.equal(rm.score(prompts, responses, batch_size, 256, precision, False, groups)[0], shared)
        assert torch.equal(rm_stored.score(prompts, responses, batch_size, 256, precision, False, groups)[0],
                           shared)
        tol = dict(rtol=0, atol=1e-5) if precision == "no" else dict(rtol=0.02, atol=0.05)
        torch.testing.assert_close(shared, whole, **tol)
    assert whole.std() > 0.1  # the scores differ, so equality is not trivially met
    if precision == "bf16":
        with pytest.raises(ValueError, match="loaded for bf16"):
            rm_stored.score(prompts, responses, 4, 256, "no")


def test_training_on_shared_prefixes_gives_the_whole_sequences_scores_loss_and_gradients(rm_tok, tmp_path):
    # the trainer runs each prompt's common start once (`shared_prefix`): its scores, loss and every parameter's
    # gradient must be the plain path's, with prompts of different lengths and responses sharing a first word
    model = reward.build_model(base_cfg(tmp_path, seed=5), rm_tok).train()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    prefs = [formats.to_preference(Row(r, f"f:{i}"), "rankings") for i, r in enumerate([
        {"prompt": "Name a fruit.", "responses": ["Apple.", "A pear, I think", "Plum"], "ranking": [0, 2, 1]},
        {"prompt": "Describe the autumn sky at dusk, in one short sentence please.",
         "responses": ["It glows orange.", "It glows", "Grey and cold, with a thin moon rising."],
         "ranking": [[0, 2], 1]}], 1)]
    items, _ = reward.encode_preferences(rm_tok, prefs, 256)
    whole = reward.collate_preferences(items, rm_tok.pad_token_id)
    shared = reward.collate_preferences(items, rm_tok.pad_token_id, share_prefix=True)
    assert shared.sequences.prefix is not None and shared.sequences.prefix.root > 0  # the template's start, once
    assert shared.sequences.input_ids.shape[1] < whole.sequences.input_ids.shape[1]
    assert shared.sequences.num_tokens == whole.sequences.num_tokens and shared.groups == whole.groups
    results = []
    for batch in (whole, shared):
        model.zero_grad()
        scores = forward.scores(model, batch.sequences)
        loss = reward.preference_loss_sum(scores, batch)
        loss.backward()
        results.append((scores.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (s0, l0, g0), (s1, l1, g1) = results
    assert s0.std() > 0.1  # the scores differ, so equality is not trivially met
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert all(g0[n].abs().sum() > 0 for n in ("score.weight", "model.embed_tokens.weight"))
    for n in g0:  # float rounding differs between the paths: tolerance relative to the tensor's largest entry
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()), msg=n)


def test_shared_prefix_is_used_only_where_it_can_run(tmp_path, rm_tok):
    model = reward.build_model(base_cfg(tmp_path), rm_tok)
    assert reward.use_shared_prefix(base_cfg(tmp_path), model)
    assert not reward.use_shared_prefix(base_cfg(tmp_path, shared_prefix=False), model)
    assert not reward.use_shared_prefix(base_cfg(tmp_path, gradient_checkpointing=True), model)
    lora = reward.build_model(base_cfg(tmp_path, lora=True), rm_tok)
    assert not reward.use_shared_prefix(base_cfg(tmp_path, lora=True), lora)
