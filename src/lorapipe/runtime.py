"""Run-time facts of a stage (wall time, peak memory, git commit), kept apart from its outputs.

Seconds and bytes change from run to run even when every output is bit-identical. Were they in
a DVC output (e.g. `reports/train.json`), two clean runs would record different hashes in
`dvc.lock`. So each stage writes them to `reports/runtime/<stage>.json`, which git tracks and DVC
does not: the facts stay versioned beside the metrics without making the lock file noisy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe.io import write_json

if TYPE_CHECKING:
    from lorapipe.config import Params

RUNTIME_DIR = "runtime"


# Notices libraries print on every stage run that are not the user's to act on (written by
# hand: neither library has a switch for them). bitsandbytes, when imported (peft imports it) on
# a CPU with AVX512-BF16, tries `kernels` for a hub CPU kernel and logs "Failed to load ..."
# without it; the hub is a download at run time, which this pipeline never relies on, and
# bitsandbytes' own kernel runs instead. peft reads `model.is_gradient_checkpointing`, which
# transformers 5 marks deprecated: a FutureWarning about peft's code, on every adapter load.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def _not_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(HUB_KERNEL_NOTICE)


def quiet_library_notices() -> None:
    """Drop the two notices above, and only them; must run before bitsandbytes is imported
    (`stages/__init__.py` calls it, so every `python -m stages.*` does)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if _not_hub_kernel_notice not in logger.filters:
        logger.addFilter(_not_hub_kernel_notice)
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)


# peft imports bitsandbytes whenever it is installed (`peft.helpers`), and bitsandbytes wraps its
# CPU kernels in `torch.compile` as it is imported: ~2.5 s of a stage's ~10 s of imports on 2
# cores, for a library only a quantised model uses. Written by hand: neither library has a
# switch to skip it.
def needs_bitsandbytes(params: Params, root: Path) -> bool:
    """Whether this run may load a quantised model: QLoRA (`quant.mode`), or a base saved
    quantised."""
    return params.quant.mode != "none" or saved_quantised(root / params.paths.base)


def saved_quantised(base_dir: Path) -> bool:
    """Whether the checkpoint in `base_dir` is saved quantised (`quantization_config` in its
    config.json). True when that config cannot be read: the stage's own checks report it, with
    bitsandbytes there as it would be."""
    try:
        config = json.loads((base_dir / "config.json").read_text("utf-8"))
        return not isinstance(config, dict) or bool(config.get("quantization_config"))
    except (OSError, ValueError):
        return True


def leave_out_bitsandbytes(module: str) -> bool:
    """When this process's program is `python -m <module>`: bitsandbytes reads as not installed
    from now on (transformers, peft and accelerate never import it), unless it is imported
    already; returns whether it did. In another program's process (tests, runpy too) nothing
    changes: the libraries remember what they found, for that program's later work."""
    argv = sys.orig_argv
    if ["-m", module] not in (argv[i : i + 2] for i in range(len(argv))):
        return False
    sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]
    return True


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


# glibc's mallopt parameter numbers and defaults (malloc.h, malloc.c)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> Any:
    """glibc, or None where there is none to tune (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to set
        return None


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap and keep freed memory there for reuse, for the rest
    of the process; True when set (Linux with glibc), False elsewhere.

    Written here because no library sets it (PyTorch's CPU allocator calls malloc and free
    for every tensor; Intel's CPU tuning guide swaps in jemalloc or tcmalloc for this reason).
    By default glibc serves blocks above its mmap threshold (at most 32 MiB) with their own mmap
    and gives them back when freed, so the next tensor of that size starts on fresh pages, each a
    page fault: on SmolLM2 a 59 MB SiLU output took 18.9 ms that way and 4.9 ms from the heap, and a
    [9600, 576] x [576, 1536] product 58 vs 43 ms. A process that makes the same shapes again and
    again (generation, a training step) keeps its peak instead. Not for quantised training, which
    `fix_mmap_threshold` keeps lean (it undoes this).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def fix_mmap_threshold(threshold: int = 2 << 20) -> bool:
    """Keep glibc's malloc threshold for serving a block with its own mmap at `threshold` bytes
    (2 MiB; glibc starts at 128 KiB); True when set (Linux with glibc), False elsewhere.

    Written here because no library sets it. By default glibc raises that threshold to the size
    of every mmap-served block freed (up to 32 MiB), so later blocks of that size come from the
    heap instead, where, freed, they stay in the process. A QLoRA step on a CPU makes exactly that
    stream of temporaries (bitsandbytes dequantises each 4-bit weight for every matmul, forward,
    backward and recomputation): at TinyLlama's shape the heap kept ~700 MiB more, over a third
    of the whole step's peak (docs/training-performance.md). Setting the threshold turns that
    adaptation off. Each block above the threshold costs a page-fault round trip each time it is
    made: at glibc's 128 KiB that was every activation of the default model, whose QLoRA step ran
    ~1.7x slower than at 2 MiB, which keeps TinyLlama's step about as lean
    (docs/training-performance.md). Only quantised training calls this: it also undoes
    `keep_freed_memory` (mmap allowed again, the heap trimmed at glibc's default), which LoRA
    training keeps.
    """
    libc = _glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(param, value)
        for param, value in (
            (M_MMAP_MAX, DEFAULT_MMAP_MAX),
            (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
            (M_MMAP_THRESHOLD, threshold),
        )
    )


def git_state(root: Path) -> dict[str, Any]:
    """The commit checked out at `root` and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def write_runtime(reports_dir: Path, stage: str, facts: Mapping[str, Any]) -> Path:
    """Write `facts`, with the git commit and dirty flag of the working tree, to
    `<reports_dir>/runtime/<stage>.json` and return that path."""
    path = Path(reports_dir) / RUNTIME_DIR / f"{stage}.json"
    write_json(path, {**facts, "git": git_state(Path.cwd())})
    return path
