"""How SFT step time and memory grow with sequence length, batch size and model size.

Each point is one `benchmarks/sft_bench.py` process (rlhfkit's SFT step, bf16 autocast over fp32 weights, loss on
the second half of each row), so its peak RSS is its own. Models: tiny-llama (2 layers, hidden 64), a mid-size
random Llama built here (12 layers, hidden 384, SmolLM2's tokenizer and vocabulary; saved once under --workdir) and
smollm2-135m (30 layers, hidden 576).

    python benchmarks/scaling_bench.py --json benchmarks/results/scaling.json

Writes a markdown table to stdout and, with --results-md, between the scaling markers of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = [  # (model, seq_len, batch): sequence length at batch 8, batch at 256 tokens, model size at 256 × 8
    ("smollm2-135m", 128, 8), ("smollm2-135m", 256, 8), ("smollm2-135m", 512, 8),
    ("smollm2-135m", 256, 2), ("smollm2-135m", 256, 4),
    ("tiny-llama", 256, 8), ("mid", 256, 8),
]


def mid_model(workdir: Path) -> str:
    """A random 12-layer Llama with hidden 384 between tiny-llama and SmolLM2, saved as a Hugging Face directory."""
    out = workdir / "mid-llama"
    if not (out / "config.json").exists():
        import torch
        from transformers import LlamaForCausalLM

        from rlhfkit import models

        tok = models.load_tokenizer("smollm2-135m")
        config = models.tiny_llama_config(len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                                          num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rlhfkit-scaling"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, seq, batch in SWEEP:
        name = mid_model(args.workdir) if model == "mid" else model
        out = args.workdir / f"{model}_{seq}x{batch}.json"
        cmd = [sys.executable, str(HERE / "sft_bench.py"), "--model", name, "--seq-len", str(seq), "--batch-size",
               str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", "bf16",
               "--peak-seconds", "1", "--json", str(out)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        rows.append({"model": model, "params": r["params_total"], "seq": seq, "batch": batch,
                     "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s_mean"], "mfu": r["mfu"],
                     "peak_rss_mb": r["peak_rss_mb"], "peak_gflops_bf16": r["peak_gflops_bf16"]})
        m = r["machine"]  # sft_bench's common.machine_info(); the same for every point
    lines = ["| model | parameters | seq | batch | tokens/s | step s | MFU (bf16 peak of its run) | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['seq']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_rss_mb']:,.0f} MB |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.results_md:
        text = args.results_md.read_text()
        start, end = "<!-- scaling:start -->", "<!-- scaling:end -->"
        body = (f"{start}\n## Scaling of the SFT step\n\n```bash\npython benchmarks/scaling_bench.py "
                f"--json benchmarks/results/scaling.json --results-md benchmarks/RESULTS.md\n```\n\n"
                f"{datetime.date.today().isoformat()}; machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), "
                f"{m['cores_usable']} usable cores, torch {m['torch']}. "
                f"bf16 autocast, {args.warmup} warm-up and {args.steps} timed steps per point, one process each.\n\n"
                f"{table}\n{end}")
        if start in text:
            text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
        args.results_md.write_text(text)


if __name__ == "__main__":
    main()
