"""Which device and precision the `trainer` params pick on a machine with or without a GPU and bf16."""

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
