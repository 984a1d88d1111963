"""The figures of compare_trl.py: one Row per training run, and the markdown section of RESULTS.md built from them.

A report (compare_trl's results JSON) is for one precision, `report["dtype"]`, "bf16" or "fp32"; its matmul peak is
`report["peak_gflops"]` = {"dtype", "before", "after"} in that dtype. Reports from before the harness had --dtype
are bf16 runs whose peak holds bf16_before/bf16_after and fp32_before/fp32_after; their machine line shows both
peaks, as it did then.
Each dtype has its own section of RESULTS.md (`markers`), so a run in one precision leaves the other's in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NAMES = {"sft": "SFT", "rm": "Reward model", "dpo": "DPO", "grpo": "GRPO"}
MARKERS = ("<!-- trl-compare:start -->", "<!-- trl-compare:end -->")  # bf16's section (the only one before --dtype)
PRECISION = {"bf16": "bf16 autocast over fp32 weights", "fp32": "fp32 weights and compute (no autocast)"}
LN2_FP32 = float.fromhex("0x1.62e430p-1")  # ln 2 rounded to float32, as the losses are computed


@dataclass
class Row:
    """One training run's figures; per-step lists include the warm-up steps."""

    algo: str
    trainer: str  # "TRL 1.16.0" or "rlhfkit"
    gradient_checkpointing: bool
    command: str
    error: str | None = None
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every token of the step's sequences, no padding
    completions: list[int] = field(default_factory=list)  # GRPO only
    peak_rss_mb: float = 0.0
    setup_s: float = 0.0  # process start to the first step
    wall_s: float = 0.0
    reference_s: float | None = None  # rlhfkit DPO: the one-off reference pass
    throughput: float = 0.0  # tokens/s (SFT, RM, DPO) or completions/s (GRPO) over the timed steps
    mfu: float = 0.0
    flops_per_token: float = 0.0
    token_check: str = ""
    compiled: bool = False  # rlhfkit --compile true
    micro_batches: int = 1  # rlhfkit: the batch in this many micro-batches, gradients accumulated (one step)

    @property
    def ckpt(self) -> str:
        return "on" if self.gradient_checkpointing else "off"

    @property
    def options(self) -> str:
        """rlhfkit's options beyond checkpointing, as the row's name and setting end: ", compiled, 4 micro-batches"."""
        return ((", compiled" if self.compiled else "")
                + (f", {self.micro_batches} micro-batches" if self.micro_batches > 1 else ""))

    @property
    def name(self) -> str:
        return self.trainer + self.options

    @property
    def setting(self) -> str:
        return f"checkpointing {self.ckpt}" + self.options


def fmt_row(r: Row, warmup: int) -> str:
    if r.error:
        return f"| {NAMES[r.algo]} | {r.name} | {r.ckpt} | failed: {r.error} | | | | | | |"
    unit = "completions/s" if r.algo == "grpo" else "tokens/s"
    losses = ", ".join(f"{x:.4f}" for x in r.losses[:3])
    timed = r.step_s[warmup:]
    return (f"| {NAMES[r.algo]} | {r.name} | {r.ckpt} | {sum(r.tokens) / len(r.tokens):,.0f} "
            f"| {r.throughput:,.{2 if r.algo == 'grpo' else 0}f} {unit} | {sum(timed) / max(len(timed), 1):.2f} "
            f"| {r.mfu:.1%} | {r.peak_rss_mb:,.0f} MB | {r.setup_s:.0f} | {losses} |")


def checks(algo: str, rows: list[Row]) -> list[str]:
    """Speed-ups and memory ratios; for DPO the step-1 loss against ln 2 and the memory ratio; the token check."""
    trl = next((r for r in rows if r.trainer.startswith("TRL") and not r.error), None)
    ours = [r for r in rows if r.trainer == "rlhfkit" and not r.error]
    out = []
    if trl and ours and trl.throughput:
        ratios = ", ".join(f"×{r.throughput / trl.throughput:.2f} ({r.setting})" for r in ours)
        out.append(f"{NAMES[algo]}: rlhfkit's throughput / TRL's: {ratios}.")
    if trl and ours and algo != "dpo":  # DPO's memory line below names its reference mode and its own target
        target = " (target ≤ 1)" if algo != "grpo" else ""
        ratios = ", ".join(f"{r.peak_rss_mb / trl.peak_rss_mb:.2f} ({r.setting})" for r in ours)
        out.append(f"{NAMES[algo]}: rlhfkit's peak RSS / TRL's{target}: {ratios}.")
    if algo == "dpo":
        step1 = [f"{r.trainer} ({r.setting}) {r.losses[0] - LN2_FP32:+.1e}"
                 for r in ([trl] if trl else []) + ours if r.losses]
        out.append("DPO step-1 loss − ln 2 (policy = reference; ln 2 in fp32): " + ", ".join(step1) + ".")
        if trl:
            out += [f"DPO peak RSS, rlhfkit with precomputed reference log-probs ({r.setting}) / TRL with "
                    f"a frozen copy: {r.peak_rss_mb / trl.peak_rss_mb:.2f} (target ≤ 0.6); rlhfkit's "
                    f"one-off reference pass took {r.reference_s or 0:.1f} s, not in its step times." for r in ours]
    if trl and trl.token_check:
        out.append(f"{NAMES[algo]} data: {trl.token_check}.")
    return out


DIFFERENCES = """\
- SFT: TRL's `assistant_only_loss` needs `{% generation %}` markers, which SmolLM2's template lacks; TRL gets the same
  template with markers around each assistant turn's content and `<|im_end|>` (the rendered text is unchanged: see
  the token check). TRL also computes entropy and token accuracy every step, as it does by default.
- DPO: TRL's completion runs to the end of the rendering, so its sequence log-prob also scores the newline the
  template writes after `<|im_end|>` (one token per sequence more, see the token check); rlhfkit stops at
  `<|im_end|>`. Both give ln 2 at step 1; later losses differ slightly. Reference: TRL's default frozen copy against
  rlhfkit's default precomputed log-probs — one of the differences being measured.
- Reward model: both start from one directory whose score head rlhfkit drew with seed 0 (TRL would draw its own);
  TRL's default learning rate (1e-4) is replaced by rlhfkit's (1e-5).
- GRPO: the samples differ (each side has its own sampler and random numbers), so losses and completion lengths
  differ; compare completions/s. Equal: prompts × generations completions per step and one optimizer step per
  generation, temperature 1, top-p 1, β = 0.04 with the k3 KL in the loss (TRL's default β = 0 would load no
  reference model), clip ε 0.2, group-normalised advantages (std + 1e-4; rlhfkit's extra whitening off), token-mean
  loss over the batch (TRL's default `dapo`), no missing-EOS penalty (rlhfkit's default −1 off), the same reward
  function. Neither makes a separate old-log-prob pass: with one epoch of one minibatch the update's own forward
  gives them (TRL: one iteration per generation; rlhfkit: `ppo.on_policy`). MFU counts the training forward and
  backward only; generation and no-grad passes are overhead.
- Gradient checkpointing: TRL through transformers' `gradient_checkpointing_enable`, rlhfkit through its own option.
- Micro-batches (rlhfkit rows marked so): the same batch per optimizer step and the same loss (the pairs' or rows'
  losses summed over micro-batches and divided by the whole batch's count), run as 4 passes of a quarter of the
  batch with gradients accumulated: less activation memory without recomputation. TRL runs each batch in one pass
  (its `gradient_accumulation_steps` would do the same for it, at its default of 1). DPO's one-off reference pass
  runs the pairs in file order, a micro-batch at a time, and the training step in its sampler's order, so the
  sequences are padded differently: in bf16 the step-1 loss then differs from ln 2 by that rounding (with whole
  batches both passes pad alike).
- rlhfkit saves the final model after the last step (in the wall time, not in the step times); TRL saves nothing.
"""


def markers(dtype: str = "bf16") -> tuple[str, str]:
    """The start and end markers of a dtype's section of RESULTS.md; bf16 keeps the original ones."""
    return MARKERS if dtype == "bf16" else (f"<!-- trl-compare:{dtype}:start -->", f"<!-- trl-compare:{dtype}:end -->")


def report_dtype(report: dict) -> str:
    """The precision of a report: its "dtype", or bf16 for reports from before --dtype."""
    return report.get("dtype") or report["peak_gflops"].get("dtype") or "bf16"


def peak_text(report: dict) -> str:
    """The end of the machine line: the matmul peak of the run, in its dtype, and which one MFU used."""
    p, peak = report["preset"], report["peak_gflops"]
    if "bf16_before" in peak:  # a report from before --dtype: bf16, with the fp32 peak beside it
        return (f"Matmul peak measured in this run ({p['peak_n']}² torch.matmul): bf16 {peak['bf16_before']:,.0f} / "
                f"{peak['bf16_after']:,.0f} GFLOP/s before / after the runs, fp32 {peak['fp32_before']:,.0f} / "
                f"{peak['fp32_after']:,.0f}; MFU uses the higher bf16 one.")
    return (f"Matmul peak measured in this run ({p['peak_n']}² torch.matmul in {report_dtype(report)}): "
            f"{peak['before']:,.0f} / {peak['after']:,.0f} GFLOP/s before / after the runs; MFU uses the higher one.")


def markdown(report: dict) -> str:
    p, m = report["preset"], report["machine"]
    dtype = report_dtype(report)
    lrs = ", ".join(f"{NAMES[a]} {o['lr']:g}" for a, o in report["optim"].items())
    o = next(iter(report["optim"].values()))
    heading = "## rlhfkit vs TRL, same machine, same run"
    lines = [
        f"{heading}: {dtype}", "",
        "```bash", report["command"], "```", "",
        f"{report['date']}: {p['model']}, every sequence ≤ {p['max_length']} tokens, batch {p['batch']} "
        f"(SFT rows; RM and DPO pairs; GRPO {p['grpo_prompts']} prompts × {p['grpo_generations']} completions of ≤ "
        f"{p['grpo_new_tokens']} tokens), {PRECISION[dtype]}, fused AdamW (lr {lrs}; betas "
        f"{'/'.join(map(str, o['betas']))}, eps {o['eps']:g}, weight decay {o['weight_decay']:g}), constant learning "
        f"rate, clipping at {o['max_grad_norm']:g}, {report['threads']} torch threads in every run. Steps: "
        + ", ".join(f"{NAMES[a]} {n}" for a, n in p["steps"].items()) + f"; the first {p['warmup']} left out of the "
        "throughput. What runs and what is made equal: `benchmarks/compare_trl.py` (docstring).", "",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores_usable']} usable cores"
        + "".join(f", {k}={v}" for k, v in report.get("env", {}).items()) + "; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ". " + peak_text(report),
        "", "| algorithm | trainer | grad. ckpt | tokens per step | throughput | step s | MFU | peak RSS | set-up s "
        "| loss, steps 1–3 |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bullets = []
    for algo, entry in report["algorithms"].items():
        rows = [Row(**r) for r in entry["rows"]]
        lines += [fmt_row(r, p["warmup"]) for r in rows]
        bullets += checks(algo, rows) + ([f"{NAMES[algo]}: {entry['note']}"] if entry.get("note") else [])
        if entry["date"] != report["date"]:
            bullets.append(f"{NAMES[algo]}: from the run of {entry['date']} (this run used --only).")
    lines += ["", *[f"- {b}" for b in bullets], "", "Differences that remain:", "", DIFFERENCES.rstrip(), "",
              "Commands as run (rlhfkit's inside benchmarks/rlhfkit_side.py, which only adds stop-watches; TRL's "
              "spec files, written by the harness, hold every value passed to TRL):", "", "```bash"]
    lines += [r["command"] for e in report["algorithms"].values() for r in e["rows"]] + ["```"]
    return "\n".join(lines)


def rewrite_results(path: Path, section: str, dtype: str = "bf16") -> None:
    """Replace what lies between the dtype's markers; without them, put the markers and the section right after
    another dtype's section (so the precisions sit side by side), or else at the end. The other sections stay."""
    start, end = markers(dtype)
    text = path.read_text()
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        ends = [text.index(e) + len(e) for e in (markers(d)[1] for d in PRECISION if d != dtype) if e in text]
        if ends:
            at = max(ends)
            text = text[:at] + "\n\n" + block + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
