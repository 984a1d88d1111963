"""Data and models for compare_trl.py: files both trainers read, and a check that they trained the same tokens.

The data are deterministic prose from a small word list (seeded), in rlhfkit's formats that are also TRL's
conversational formats: {"messages"} for SFT, {"prompt", "chosen", "rejected"} message lists for RM and DPO,
{"prompt"} message lists for GRPO. Every sequence is filled to just under the length limit, measured with the
model's real chat template, so that neither trainer truncates and both see full-length sequences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = """time people way water day part number sound word place year work back thing name sentence man line
river city tree farm story sea night life paper group song letter mile mountain morning island music winter market
garden window bridge teacher kitchen valley harbour engine forest village lantern pencil bottle ladder compass small
large quiet bright early late warm cold simple careful slow quick gentle heavy light open old new green golden
walks carries builds finds keeps follows reads writes opens watches shows turns brings moves holds learns tells
under over near across along behind before after during through around between beyond and but then so because
while""".split()
TOPICS = ("describe a quiet harbour at dawn.", "explain why bridges need expansion joints.",
          "say what makes bread rise.", "describe the smell of rain on a city street.",
          "explain how a compass finds north.", "describe a mountain village in winter.",
          "say why leaves change colour in autumn.", "describe a busy kitchen before dinner.")


def prose(words: list[str]) -> str:
    sentences = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def longest(tok, make, budget: int, generation_prompt: bool = False) -> int:
    """Largest n whose rendering `make(n)` (a message list) is at most `budget` tokens (binary search)."""
    from rlhfkit.data import chat

    size = lambda n: len(chat.encode(tok, chat.render(tok, make(n), generation_prompt)))  # noqa: E731
    lo, hi = 1, budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return lo


def write_data(tok, max_length: int, batch: int, grpo_prompts: int, out: Path, seed: int = 0) -> dict[str, Path]:
    """One batch of SFT rows and of pairs (prompts of about half the limit, answers that fill the rest), and the
    GRPO prompts (short instructions with a word budget, which benchmarks/ppo_rewards.py:length_target scores)."""
    rng = random.Random(seed)
    draw = lambda: [rng.choice(WORDS) for _ in range(max_length)]  # noqa: E731
    user = lambda ws: {"role": "user", "content": prose(ws)}  # noqa: E731
    answer = lambda ws: {"role": "assistant", "content": prose(ws)}  # noqa: E731

    def prompt() -> list[dict]:
        ws = draw()
        return [user(ws[:longest(tok, lambda n: [user(ws[:n])], max_length // 2, generation_prompt=True)])]

    def reply(p: list[dict]) -> list[dict]:
        ws = draw()
        return [answer(ws[:longest(tok, lambda n: p + [answer(ws[:n])], max_length)])]

    sft = [{"messages": (p := prompt()) + reply(p)} for _ in range(batch)]
    pairs = [{"prompt": (p := prompt()), "chosen": reply(p), "rejected": reply(p)} for _ in range(batch)]
    prompts = [{"prompt": [{"role": "user", "content": f"In about twelve words, {TOPICS[i % len(TOPICS)]}"}]}
               for i in range(grpo_prompts)]
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl", "prompts": out / "prompts.jsonl"}
    for key, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def rlhfkit_sequences(algo: str, files: dict[str, Path], tok, rm_tok, max_length: int) -> list[dict]:
    """What rlhfkit trains on, through its own tokenisation code: ids and loss masks (RM: ids only, in file order,
    chosen before rejected)."""
    from rlhfkit import reward_model
    from rlhfkit.data import chat

    rows = [json.loads(line) for line in files["sft" if algo == "sft" else "pairs"].read_text().splitlines()]
    if algo == "sft":
        return [{"ids": e.input_ids, "mask": e.loss_mask}
                for e in (chat.tokenize_conversation(tok, r["messages"], "", max_length) for r in rows)]
    out = []
    for r in rows:
        for side in ("chosen", "rejected"):
            if algo == "rm":
                out.append({"ids": reward_model.encode(rm_tok, r["prompt"] + r[side], max_length, "")[0]})
            else:
                e = chat.tokenize_response(tok, r["prompt"], r[side], "", max_length)
                out.append({"ids": e.input_ids, "mask": e.loss_mask})
    return out


def prompt_tokens(tok, prompts: Path) -> int:
    """Tokens of all GRPO prompts, rendered with the generation prompt (what both trainers feed the model)."""
    from rlhfkit.data import chat

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    return sum(len(chat.encode(tok, chat.render(tok, r["prompt"], True))) for r in rows)


def trained(seqs: list[dict]) -> int:
    """Positions whose next token carries loss (what a causal LM's loss averages over)."""
    return sum(sum(s["mask"][1:]) for s in seqs)


def check_tokens(expected: list[dict], got: list[dict]) -> str:
    """One line: are the token ids and loss masks TRL built from the file the ones rlhfkit built?"""
    if not got:
        return ""
    same_ids = len(expected) == len(got) and all(e["ids"] == g["ids"] for e, g in zip(expected, got))
    line = f"token ids {'identical' if same_ids else 'DIFFER'} ({sum(len(g['ids']) for g in got):,} tokens)"
    if "mask" in expected[0]:
        a, b = trained(expected), trained(got)
        line += f"; trained tokens rlhfkit {a:,}, TRL {b:,}" + (" (same)" if a == b else f" (TRL {b - a:+,})")
    return line


def training_chat_template(tok) -> str:
    """The tokenizer's template with `{% generation %}` around each assistant turn's content and end-of-turn
    token, which TRL's assistant_only_loss needs; the rendered text stays character for character the same."""
    # SmolLM2's template has real newlines inside its jinja string literals
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    marked = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
              "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    if plain not in tok.chat_template:
        raise SystemExit("this harness knows how to mark SmolLM2's ChatML template only (TRL's assistant_only_loss "
                         "needs {% generation %} markers); extend training_chat_template for this model")
    return tok.chat_template.replace(plain, marked)


def prepare_models(model: str, root: Path) -> tuple[Path, Path]:
    """(causal LM directory, initial reward-model directory), plain Hugging Face directories that both load.

    The reward model's new score head is drawn once, by rlhfkit's build (seed 0), and saved: both trainers then
    start from the very same weights (TRL would otherwise draw its own head from its own RNG state)."""
    from rlhfkit import models, reward_model
    from rlhfkit.algos import reward

    if model == "tiny-llama":  # saved once, so that TRL can load it like any directory
        causal = root / "models" / "tiny-llama"
        if not causal.is_dir():
            tok = models.load_tokenizer("tiny-llama")
            models.save_pretrained(models.load_causal_lm("tiny-llama", seed=0, tokenizer=tok), tok, causal)
    else:
        causal = Path(models.resolve(model).path)
    rm_dir = root / "models" / f"{model}-rm-init"
    if not rm_dir.is_dir():
        tok = models.load_tokenizer(str(causal))
        reward_model.set_reward_pad_token(tok)
        rm = reward.build_model(reward.RMConfig(model=str(causal), seed=0), tok)
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    return causal, rm_dir
