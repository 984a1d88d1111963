"""Rollout generation: rlhfkit's HFEngine against a plain `model.generate` call, same batch and settings.

Both sample one response of at most --max-new-tokens tokens to each of --prompts prompts of the built-in task
(chat template, SmolLM2's tokenizer), batch --batch-size, temperature --temperature, bf16 on the CPU (autocast
around `generate`, as a user of transformers would write it; the engine uses its own bf16 path). Tokens/s counts
generated tokens up to and including the stop token, over the wall time of the whole call (prefill included).
The engine is timed with each of --backends: "llama" (`LlamaBatch`, the default for Llama models) and "hf"
(transformers' forward, `HFBatch`); "vllm" times `VLLMEngine` (vLLM in this process, bf16, its own batching) on the
same prompts, where vLLM is installed (scripts/setup --with vllm; run with .venv-vllm/bin/python). Its start-up
and first weight sync are timed apart (`startup_s`); its generate call is timed like the others.

    python benchmarks/generate_bench.py --model smollm2-135m --prompts 128 --batch-size 64 --max-new-tokens 48
    python benchmarks/generate_bench.py --quick     # tiny-llama, 8 prompts, 8 tokens: checks the harness
    .venv-vllm/bin/python benchmarks/generate_bench.py --backends llama,vllm --prompts 128 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlhfkit import models
from rlhfkit.data import chat
from rlhfkit.rollout import SamplingParams
from rlhfkit.data.collate import pad_left
from rlhfkit.models import autocast
from rlhfkit.rollout.hf import HFEngine
from rlhfkit.sim import tasks


def plain_generate(model, tok, prompts, batch_size: int, max_new_tokens: int, temperature: float) -> tuple[int, float]:
    stop = sorted(chat.end_of_turn_ids(tok))
    encoded = [chat.encode(tok, chat.render(tok, p, add_generation_prompt=True)) for p in prompts]
    generated, start = 0, time.perf_counter()
    for i in range(0, len(encoded), batch_size):
        ids, mask = pad_left(encoded[i:i + batch_size], tok.pad_token_id)
        with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, ids.shape[1]:]
        for row in new.tolist():  # up to and including the first stop token
            ends = [k for k, t in enumerate(row) if t in stop]
            generated += ends[0] + 1 if ends else len(row)
    return generated, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--backends", default="llama,hf", help="HFEngine backends to time, comma-separated")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 8 prompts, batch 4, 8 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.model, args.prompts, args.batch_size, args.max_new_tokens = "tiny-llama", 8, 4, 8
    tok = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, tokenizer=tok).eval()
    prompts = [[{"role": "user", "content": t.prompt}] for t in tasks.split("eval")[:args.prompts]]
    torch.manual_seed(0)
    plain_tokens, plain_s = plain_generate(model, tok, prompts, args.batch_size, args.max_new_tokens,
                                           args.temperature)
    result = {"model": args.model, "prompts": args.prompts, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens,
              "generate": {"tokens": plain_tokens, "seconds": plain_s, "tokens_per_s": plain_tokens / plain_s}}
    for backend in args.backends.split(","):
        start = time.perf_counter()
        if backend == "vllm":
            from rlhfkit.rollout.vllm import VLLMEngine

            engine, name = VLLMEngine(model, tok, "bf16"), "vllm"
        else:
            engine, name = HFEngine(model, tok, args.batch_size, "bf16", backend=backend), f"hfengine-{backend}"
        startup = time.perf_counter() - start
        start = time.perf_counter()
        s = engine.generate(prompts, SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens))
        seconds, tokens = time.perf_counter() - start, int(s.response_lengths.sum())
        result[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                        "speedup": tokens / seconds / result["generate"]["tokens_per_s"]}
        if backend == "vllm":
            result[name]["startup_s"] = startup
            del engine
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
