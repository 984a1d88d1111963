"""A run's directory belongs to one run: an earlier run's files need --resume or --overwrite, and a directory that
another live process writes is refused with its pid."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rlhfkit import UsageError
from rlhfkit.tracking import LOCK_NAME, claim_output, release_output

from tests.conftest import run_cli


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    claim_output(out, resume=False, overwrite=False)  # a new directory
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "checkpoints").mkdir()
    release_output(out)
    with pytest.raises(UsageError, match=r"already holds a run \(checkpoints, metrics.jsonl\): pass --resume"):
        claim_output(out, resume=False, overwrite=False)
    claim_output(out, resume=True, overwrite=False)  # continuing it keeps its files
    assert (out / "metrics.jsonl").is_file()
    release_output(out)
    claim_output(out, resume=False, overwrite=True)  # replacing it removes them
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    release_output(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="a file of that name exists"):
        claim_output(tmp_path / "file", resume=False, overwrite=False)


def test_a_directory_in_use_by_another_process_is_refused_with_its_pid(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from rlhfkit.tracking import claim_output
        claim_output({str(out)!r}, resume=False, overwrite=False)
        print("claimed", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(UsageError, match=rf"in use by pid {holder.pid} "):
            claim_output(out, resume=True, overwrite=True)  # neither flag takes a live run's directory
    finally:
        holder.kill()
        holder.wait()
    claim_output(out, resume=True, overwrite=False)  # the kernel dropped the dead holder's lock
    release_output(out)


def test_a_second_sft_into_the_same_directory_is_refused_and_the_first_run_kept(tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "--model", "tiny-llama", "--data", "sample:conversations", "--max-steps", "1", "--batch-size", "2",
            "--dtype", "float32", "--max-length", "64", "--output", str(out)]
    run_cli(*args)
    metrics = (out / "metrics.jsonl").read_text()
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == metrics
    run_cli(*args, "--overwrite")
