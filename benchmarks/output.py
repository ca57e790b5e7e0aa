"""How every benchmark ends: its JSON written, its table printed, then `written to <path>`
(benchmarks/run_all.py keeps what a benchmark prints up to that line as its table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapipe.io import write_json


def publish(out: str | Path, result: dict[str, Any], table: str) -> int:
    """Write `result` to `out` as JSON, print `table` and where the JSON went; exit status 0
    (a benchmark reports whether its target holds; missing it is not an error)."""
    write_json(Path(out), result)
    print(table)
    print(f"written to {out}")
    return 0
