"""Run-time facts of a stage (wall time, peak memory), kept apart from its DVC outputs.

Seconds and bytes change from run to run even when every output is bit-identical. Were they in
a DVC output (e.g. `reports/train.json`), two clean runs would record different hashes in
`dvc.lock`. So each stage writes them to `reports/runtime/<stage>.json`, which git tracks and DVC
does not: the facts stay versioned beside the metrics without making the lock file noisy.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorapipe.io import write_json

RUNTIME_DIR = "runtime"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux, `VmHWM` from /proc/self/status: it belongs to this process's own address space.
    `getrusage`'s `ru_maxrss` is inherited across fork and kept across exec, so under `dvc repro`
    or a benchmark driver it would report the parent's peak when that is larger. Elsewhere,
    `ru_maxrss` (bytes on macOS, KiB on other systems).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def write_runtime(reports_dir: Path, stage: str, facts: Mapping[str, Any]) -> Path:
    """Write `facts` to `<reports_dir>/runtime/<stage>.json` and return that path."""
    path = Path(reports_dir) / RUNTIME_DIR / f"{stage}.json"
    write_json(path, dict(facts))
    return path
