"""Which device and precision the `trainer` params pick on a machine with or without a GPU and bf16; how the process
takes its CPU memory; how the benchmarks measure peak memory."""

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from rastp.hardware import resolve_precision, trainer_device


@pytest.mark.parametrize("cuda, accelerator, expected", [
    (True, "auto", "cuda"), (True, "gpu", "cuda"), (True, "cuda", "cuda"),
    (True, "cpu", "cpu"),      # the CPU asked for on a GPU machine
    (False, "auto", "cpu"), (False, "gpu", "cpu"),
])
def test_the_trainer_device_is_the_gpu_only_where_there_is_one_and_it_is_allowed(monkeypatch, cuda, accelerator,
                                                                                  expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert trainer_device(accelerator).type == expected


@pytest.mark.parametrize("cuda, cuda_bf16, avx512_bf16, amx, accelerator, expected", [
    (False, False, True, False, "auto", "bf16-mixed"),   # CPU with AVX512-BF16
    (False, False, False, True, "cpu", "bf16-mixed"),    # CPU with AMX
    (False, False, False, False, "auto", "32-true"),     # CPU that would emulate bf16
    (True, True, False, False, "auto", "bf16-mixed"),    # bf16 GPU
    (True, False, True, False, "gpu", "32-true"),        # GPU without bf16: the CPU's instructions do not count
    (True, True, False, False, "cpu", "32-true"),        # CPU asked for on a GPU machine
])
def test_auto_precision_is_bf16_mixed_only_where_the_device_has_bf16(monkeypatch, cuda, cuda_bf16, avx512_bf16, amx,
                                                                     accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", accelerator) == expected
    assert resolve_precision("16-mixed", accelerator) == "16-mixed"  # an explicit choice is Lightning's


# A fresh interpreter: calls keep_freed_memory_for_reuse() (or not: "default"), then mallocs, fills and frees 40 MiB
# twice; prints whether the call took and the page faults of the second block.
REALLOCATION = """
import ctypes, resource, sys
from rastp.hardware import keep_freed_memory_for_reuse
took = sys.argv[1] == "call" and keep_freed_memory_for_reuse()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(40 * 2**20)
    ctypes.memset(block, 1, 40 * 2**20)
    libc.free(block)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def reallocation(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", REALLOCATION, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults_unless_glibcs_defaults_are_asked_for():
    pages = 40 * 2**20 // resource.getpagesize()
    _, faults = reallocation("default")
    assert faults > 0.9 * pages  # glibc maps a block above 32 MiB afresh from the kernel each time
    took, faults = reallocation("call")
    assert took and faults < 0.05 * pages  # kept on the heap: the same pages serve again
    took, faults = reallocation("call", RASTP_GLIBC_MALLOC_DEFAULTS="1")
    assert not took and faults > 0.9 * pages


# A fresh interpreter: the peak memory of filling a float32 tensor of the given MiB (0: doing nothing).
PEAK = """
import sys, torch
from rastp.hardware import peak_memory_mib
mib = int(sys.argv[1])
print(peak_memory_mib(lambda: torch.ones(mib * 2**18) if mib else None, torch.device("cpu")))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="the peak resident set of /proc/self")
def test_peak_memory_is_what_the_task_adds_to_the_process():
    peak = {mib: float(subprocess.run([sys.executable, "-c", PEAK, str(mib)], capture_output=True, text=True,
                                      check=True).stdout) for mib in (0, 64)}
    assert peak[0] < 4 and 62 < peak[64] < 72
