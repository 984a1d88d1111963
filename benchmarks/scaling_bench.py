"""How SFT step time and memory grow with sequence length, batch size and model size.

Each point is one `rlhfkit sft` run through compare_trl.py's harness, rlhfkit alone (its own training loop, data
loading and logging included; every row filled to just under the length, loss on the answer, about its second
half), in its own process, so its peak RSS is its own. Models: tiny-llama (2 layers, hidden 64), a mid-size
random Llama built here (12 layers, hidden 384, SmolLM2's tokenizer and vocabulary; saved once under --workdir) and
smollm2-135m (30 layers, hidden 576).

    python benchmarks/scaling_bench.py --json benchmarks/results/scaling.json
    python benchmarks/scaling_bench.py --quick      # two tiny-llama points: checks the harness

Writes a markdown table to stdout and, with --results-md, between the scaling markers of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script from anywhere: find the helper modules beside this file
from common import write_section  # noqa: E402
SWEEP = [  # (model, seq_len, batch): sequence length at batch 8, batch at 256 tokens, model size at 256 × 8
    ("smollm2-135m", 128, 8), ("smollm2-135m", 256, 8), ("smollm2-135m", 512, 8),
    ("smollm2-135m", 256, 2), ("smollm2-135m", 256, 4),
    ("tiny-llama", 256, 8), ("mid", 256, 8),
]
QUICK = [("tiny-llama", 128, 2), ("tiny-llama", 128, 4)]


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


def params_total(name: str) -> int:
    """Parameters of a model (counted on the meta device: nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfkit import models

    src = models.resolve(name)
    config = models.tiny_llama_config(len(models.load_tokenizer(name))) if src.path is None else \
        AutoConfig.from_pretrained(src.path)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def point(name: str, seq: int, batch: int, args: argparse.Namespace) -> dict:
    """One point: `rlhfkit sft` through compare_trl.py's harness, rlhfkit alone (its default: checkpointing off)."""
    tag = f"{Path(name).name}_{seq}x{batch}"
    out = args.workdir / f"{tag}.json"
    cmd = [sys.executable, str(HERE / "compare_trl.py"), "--only", "sft", "--variants", "nogc", "--model", name,
           "--max-length", str(seq), "--batch", str(batch), "--steps", str(args.warmup + args.steps),
           "--warmup", str(args.warmup), "--dtype", args.dtype, "--workdir", str(args.workdir / tag),
           "--results-json", str(out), "--no-write-results"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    row = report["algorithms"]["sft"]["rows"][0]
    if row["error"]:
        raise SystemExit(f"{tag}: {row['error']}")
    timed = row["step_s"][args.warmup:]
    return {"seq": seq, "batch": batch, "tokens_per_s": row["throughput"], "step_s": sum(timed) / len(timed),
            "timed_steps_s": timed,
            "mfu": row["mfu"], "peak_rss_mb": row["peak_rss_mb"], "dtype": report["dtype"],
            "peak_gflops": max(report["peak_gflops"]["before"], report["peak_gflops"]["after"]),
            "machine": report["machine"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two tiny-llama points, one timed step (harness check)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out (new shapes: kernel set-up)")
    p.add_argument("--dtype", default="auto", help="as compare_trl.py's --dtype (auto: rlhfkit's own choice here)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rlhfkit-scaling"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.steps = 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, seq, batch in QUICK if args.quick else SWEEP:
        name = mid_model(args.workdir) if model == "mid" else model
        rows.append({"model": model, "params": params_total(name), **point(name, seq, batch, args)})
    m = rows[0].pop("machine")  # the same for every point
    for r in rows[1:]:
        r.pop("machine")
    lines = ["| model | parameters | seq | batch | tokens/s | step s, mean (min–max) | MFU (peak of its run) | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['seq']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.2f} ({min(r['timed_steps_s']):.2f}–{max(r['timed_steps_s']):.2f}) | "
              f"{100 * r['mfu']:.1f}% | {r['peak_rss_mb']:,.0f} MB |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.results_md:
        peaks = [r["peak_gflops"] for r in rows]
        command = ("python benchmarks/scaling_bench.py --json benchmarks/results/scaling.json "
                   "--results-md benchmarks/RESULTS.md")
        text = (f"`rlhfkit sft` itself (compare_trl.py's harness, rlhfkit alone), {rows[0]['dtype']}, {args.warmup} "
                f"warm-up and {args.steps} timed steps per point, one process each; the matmul peak behind MFU, "
                f"measured in each point's run, ranged {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s.\n\n{table}")
        write_section(args.results_md, "scaling", "Scaling of the SFT step", command, m, text)


if __name__ == "__main__":
    main()
