"""Read rows from `.jsonl`, `.json` (either gzipped: `.jsonl.gz`, `.json.gz`), `.parquet`, `.csv` or a `datasets`
directory saved with `save_to_disk`.

Every row keeps where it came from (`file:line` for text formats, `file:row N` otherwise), so that a malformed
row is reported where a person can find it. JSON Lines are parsed here, line by line, for exact line numbers
(also inside a gzipped file, and in a `.json` file that holds JSON Lines, as `Dataset.to_json` writes them);
the other formats go through `datasets`. Outputs are written as JSON Lines (`write_jsonl`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit import DataError
from rlhfkit.data import sources

SAMPLES = Path(__file__).parent / "samples"


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from (for error messages)."""

    data: dict[str, Any]
    where: str  # "path:line" or "path:row N"


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a data source (`sources.parse`'s data forms), each a dict, in file order: a file,
    `sample:NAME` (a bundled sample file) or `sim:SPLIT` (the prompts of a split of the built-in task,
    rlhfkit/sim/tasks.py), so every command that reads data takes all three."""
    src = sources.parse(str(path), "data source", sources.DATA)
    if src.kind == "sim":
        from rlhfkit.sim import tasks

        if src.value not in tasks.SPLITS:
            raise DataError(f"no built-in task split {src.value!r}; available: {', '.join(tasks.SPLITS)}")
        return [Row(tasks.to_row(t), f"{path}:{i + 1}") for i, t in enumerate(tasks.split(src.value))]
    if src.kind == "sample":
        hits = sorted(SAMPLES.glob(src.value + ".*"))
        if not hits:
            valid = sorted(p.stem for p in SAMPLES.glob("*.jsonl"))
            raise DataError(f"no bundled sample {src.value!r}; available: {', '.join(valid)}")
        p = hits[0]
    else:
        p = Path(src.value).expanduser()
        if not p.exists():
            hub = re.fullmatch(r"[\w.-]+/[\w.-]+", src.value) and not p.suffix  # owner/name, as the hub names them
            raise DataError(f"data file not found: {p}" + (
                f"; {src.value!r} looks like a Hugging Face hub data set: rlhfkit reads local data only, so save it "
                f"first (datasets.load_dataset({src.value!r}, split='train').save_to_disk(DIR)) and give --data DIR"
                if hub else ""))
    if p.is_dir():
        return _read_datasets_dir(p)
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz"):
        return _read_jsonl(p)
    if suffix in (".json", ".json.gz"):
        return _read_json(p)
    if suffix in (".parquet", ".csv"):
        return _read_with_datasets(p, suffix[1:])
    raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json, .jsonl.gz, .json.gz, .parquet, .csv "
                    "or a save_to_disk directory)")


def _read_bytes(p: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    if p.suffix.lower() != ".gz":
        return p.read_bytes()
    try:
        return gzip.decompress(p.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: not a readable gzip file ({e})") from None


def _utf8(raw: bytes, p: Path, first_line: int = 1) -> str:
    """`raw` decoded as UTF-8, or a DataError naming the file, line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the "
                        "file as UTF-8") from None


def _read_jsonl(p: Path, raw: bytes | None = None) -> list[Row]:
    """JSON Lines from the file (or from its bytes `raw`, read already), one object a line."""
    rows = []
    for lineno, line_bytes in enumerate((_read_bytes(p) if raw is None else raw).split(b"\n"), 1):
        line = _utf8(line_bytes, p, lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, f"{p}:{lineno}"))
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def _read_json(p: Path) -> list[Row]:
    raw = _read_bytes(p)
    try:
        obj = json.loads(_utf8(raw, p))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and raw.lstrip().startswith(b"{"):
            return _read_jsonl(p, raw)  # one object a line, as `Dataset.to_json` writes a .json file
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{p}: expected a JSON list of objects")
    return [Row(r, f"{p}:row {i}") for i, r in enumerate(obj, 1)]


def _table_rows(ds, p: Path, first_line: int = 1, unit: str = "row ") -> list[Row]:
    return [Row(dict(r), f"{p}:{unit}{i}") for i, r in enumerate(ds, first_line)]


def _read_with_datasets(p: Path, kind: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{p}: cannot read as {kind}: {e}") from None
    # csv: the header is line 1, so row i sits on line i + 1
    return _table_rows(ds, p, first_line=2, unit="") if kind == "csv" else _table_rows(ds, p)


def _read_datasets_dir(p: Path) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: not a datasets directory saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
        ds = ds["train"]
    return _table_rows(ds, p)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines (via a temporary file, so a killed run leaves no half file); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
