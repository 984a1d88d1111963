"""Child process of compare_trl.py: one rlhfkit CLI run (`rlhfkit sft|rm|dpo|ppo ...`), timed from inside.

    python benchmarks/rlhfkit_side.py --threads 2 --result R.json -- sft --model M --data D --output OUT ...

Everything after `--` goes unchanged to `rlhfkit.cli.main`, the function behind the `rlhfkit` console script, so
the run is exactly that command: data loading, tokenisation, the trainer's own loop, logging and saving. Running it
in-process here instead of as `rlhfkit ...` adds two stop-watches, nothing else:
- `Tracker.__init__` and `Tracker.log` are stamped with time.perf_counter(), so the harness gets the wall time of
  every logged step (the trackers are created right before each trainer's loop; with --log-steps 1 every step is
  logged);
- `dpo.precomputed_reference` is timed, so DPO's one-off reference pass is reported apart from the steps.
The losses, token counts and phase timings themselves are read from the run's metrics.jsonl by the harness.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, required=True, help="torch intra-op threads (same for every run)")
    p.add_argument("--result", type=Path, required=True, help="where this run's timing JSON goes")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the rlhfkit command line")
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    torch.set_num_threads(args.threads)

    from rlhfkit import cli, tracking
    from rlhfkit.algos import dpo

    stamps: dict[str, list] = {"tracker_init": [], "log": []}
    original_init, original_log = tracking.Tracker.__init__, tracking.Tracker.log

    @functools.wraps(original_init)
    def init(self, *a, **kw):
        stamps["tracker_init"].append(time.perf_counter() - T_START)
        original_init(self, *a, **kw)

    @functools.wraps(original_log)
    def log(self, step, metrics):
        original_log(self, step, metrics)
        stamps["log"].append([step, time.perf_counter() - T_START, sorted(metrics)])

    tracking.Tracker.__init__, tracking.Tracker.log = init, log
    precompute: list[float] = []
    original_reference = dpo.precomputed_reference

    @functools.wraps(original_reference)
    def timed_reference(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original_reference(*a, **kw)
        finally:
            precompute.append(time.perf_counter() - t0)

    dpo.precomputed_reference = timed_reference

    code = cli.main(argv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args.result.write_text(json.dumps({
        "exit_code": code, "wall_s": time.perf_counter() - T_START, "stamps": stamps,
        "precompute_s": sum(precompute) if precompute else None,
        "peak_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10,
        "threads": torch.get_num_threads(),
    }))
    sys.exit(code)


if __name__ == "__main__":
    main()
