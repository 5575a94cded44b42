"""What the `trainer` params mean on this machine: the device a stage computes on, and TIGER's precision; how the
process takes its CPU memory; and how the benchmarks measure time and peak memory on either device."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Set to 1, keep_freed_memory_for_reuse leaves glibc's defaults: less peak memory, or bench/README.md's comparison.
MALLOC_DEFAULTS_ENV = "RASTP_GLIBC_MALLOC_DEFAULTS"


def trainer_device(accelerator: str) -> torch.device:
    """Lightning's `auto`, `gpu` and `cuda` take the CUDA GPU where there is one; `cpu` (or no GPU) the CPU."""
    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning's precision for TIGER. `auto`: bf16 mixed precision where the device multiplies bf16 in hardware (a
    CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), else fp32; any other value is Lightning's own. On the README's
    AVX512-BF16 CPU the train stage runs 2.0x faster in bf16-mixed, at the same validation loss (bench/README.md);
    without the instructions bf16 would be emulated, so fp32 is kept."""
    if precision != "auto":
        return precision
    if trainer_device(accelerator).type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        # torch's own CPU feature probes (no public spelling in torch 2.13; the version is pinned).
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native_bf16 else "32-true"


def keep_freed_memory_for_reuse() -> bool:
    """Serve every CPU allocation from the heap and keep what is freed there for the next one (glibc's malloc; on
    other C libraries, or with RASTP_GLIBC_MALLOC_DEFAULTS=1 in the environment, nothing changes and False is
    returned).

    By default glibc maps each block above a moving threshold (at most 32 MiB) straight from the OS and unmaps it when
    freed, and gives freed memory at the top of the heap back. A training step frees its activations and allocates
    them again in the next step, so the pages come back from the kernel zeroed, one page fault per 4 KiB, step after
    step: on the README's 2-core CPU a sixth of an unpruned TIGER's training time at batch 256, two fifths with four
    pruned models interleaved ("CPU memory" in bench/README.md). Kept, they cost more peak memory, since the heap no
    longer shrinks between a step's peaks (measured: up to 15% more when training, 1.8x for transformers'
    `generate`). Outputs do not change."""
    if platform.libc_ver()[0] != "glibc" or os.environ.get(MALLOC_DEFAULTS_ENV) == "1":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def timed(run: Callable[[], object]) -> tuple[object, float]:
    """(`run()`'s result, the wall seconds it took), waiting for the GPU's queued work where there is one."""
    start = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """How much memory `run()` takes at its peak beyond what was in use before it, in MiB: on CUDA torch's peak
    allocated; on the CPU the rise of the process's peak resident set (Linux, reset through /proc/self/clear_refs).
    Run it in a fresh process for a task's own figure: memory an earlier task freed and the heap kept serves a later
    one (`keep_freed_memory_for_reuse`)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set (VmHWM) restarts from the current one
    base = _proc_status_mib("VmRSS")
    run()
    return _proc_status_mib("VmHWM") - base


def in_fresh_process(target: Callable[..., None], *args) -> object:
    """What `target(*args, queue)` puts on its queue, run in a freshly spawned process (for a task's own peak memory:
    `peak_memory_mib`)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(f"/proc/self/status: no {field}")
