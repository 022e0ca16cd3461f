"""Which all-reduce runs at which size (kernels/symm_mem.py), and which GPU a TP rank takes (harness/worker.py):
the choices that make the all-off baseline the one a serving engine runs, and let symmetric memory see peers."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fusiontune.harness.process_group import local_gpu_index
from fusiontune.kernels import symm_mem
from fusiontune.kernels.symm_mem import MiB, CollectiveSettings, allreduce_method, fused_method


def test_auto_takes_one_shot_then_two_shot_then_nccl_by_size():
    one, two = symm_mem.SYMM_MEM_ALLREDUCE_BOUNDS[2]
    assert [allreduce_method(n, 2) for n in (8 * 1024, one, one + 2, two, two + 2)] == \
        ["one-shot", "one-shot", "two-shot", "two-shot", "nccl"]
    assert allreduce_method(64 * MiB, 16) == allreduce_method(64 * MiB, 8)  # a TP size not listed: the next below


def test_forced_choices():
    assert allreduce_method(1024, 4, CollectiveSettings(allreduce="nccl")) == "nccl"
    forced = CollectiveSettings(allreduce="symm-mem")
    assert allreduce_method(symm_mem.SYMM_MEM_ALLREDUCE_BOUNDS[4][1] * 2, 4, forced) == "two-shot"
    assert allreduce_method(symm_mem.SYMM_MEM_MAX_BYTES * 2, 4, forced) == "nccl"  # beyond any workspace


def test_the_fused_op_takes_its_kernel_where_it_measured_faster():
    one_shot, two_shot = symm_mem.FUSED_BOUNDS[2]["fp8"]
    assert [fused_method(n, 2, quant=True) for n in (1024, one_shot, one_shot + 2, two_shot, two_shot + 2)] == \
        ["one-shot", "one-shot", "two-shot", "two-shot", "unfused"]
    one_shot, two_shot = symm_mem.FUSED_BOUNDS[4]["none"]
    assert fused_method(two_shot + 2, 4, quant=False) == "unfused"
    assert fused_method(two_shot + 2, 8, quant=False) == "unfused"  # a TP size not listed: the next below
    forced = CollectiveSettings(allreduce_backend="fusiontune")
    assert fused_method(1024, 4, True, forced) == "one-shot"
    assert fused_method(symm_mem.SYMM_MEM_MAX_BYTES, 4, True, forced) == "two-shot"
    assert fused_method(symm_mem.SYMM_MEM_MAX_BYTES + 2, 4, True, forced) == "unfused"  # beyond the workspace
    assert fused_method(1024, 2, False, CollectiveSettings(allreduce_backend="nccl")) == "unfused"
    flashinfer = CollectiveSettings(allreduce_backend="flashinfer")  # FlashInfer's kernel up to its workspace bound
    assert [fused_method(n, 4, True, flashinfer) for n in (1024, symm_mem.SYMM_MEM_MAX_BYTES,
                                                           symm_mem.SYMM_MEM_MAX_BYTES + 2)] == \
        ["flashinfer", "flashinfer", "unfused"]


def test_a_bad_choice_names_the_field():
    with pytest.raises(ValueError, match="collectives.allreduce_backend must be one of auto, fusiontune, flashinfer, "
                                         "nccl, got 'trtllm'"):
        CollectiveSettings(allreduce_backend="trtllm")


def test_flashinfer_missing_is_one_clear_error(monkeypatch):
    """Without flashinfer-python the FlashInfer backend says what to install (a row's error), not an ImportError
    from deep inside."""
    import builtins

    from fusiontune.kernels import flashinfer_allreduce

    real_import = builtins.__import__

    def no_flashinfer(name, *args, **kwargs):
        if name.startswith("flashinfer"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flashinfer)
    with pytest.raises(RuntimeError, match="allreduce_backend: flashinfer needs flashinfer-python"):
        flashinfer_allreduce.allreduce_add_rms_norm(torch.ones(2, 8), torch.ones(2, 8), torch.ones(8), 1e-6, None, "0")


def test_used_implementations_are_taken_once():
    symm_mem.take_used()
    symm_mem.record("nccl")
    symm_mem.record("fusiontune one-shot")
    symm_mem.record("nccl")
    assert symm_mem.used() == {"fusiontune one-shot", "nccl"}  # a look (the correctness check's) keeps them
    assert symm_mem.take_used() == "fusiontune one-shot,nccl" and symm_mem.take_used() == ""
    assert symm_mem.used() == set()


@pytest.mark.parametrize("visible, expected", [("2,3", 1), ("", 3), ("3", 0)])
def test_a_ray_rank_takes_the_gpu_ray_assigned_among_those_it_sees(monkeypatch, visible, expected):
    """With every GPU visible (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) the assigned id is the index; where
    CUDA_VISIBLE_DEVICES lists GPUs, its position there."""
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: ["3"])
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpu_index(rank=0) == expected


def test_ray_workers_see_every_gpu_and_never_multicast():
    from fusiontune.harness.launcher import WORKER_ENV

    assert WORKER_ENV["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert WORKER_ENV["NCCL_NVLS_ENABLE"] == "0" and WORKER_ENV["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert WORKER_ENV["NVSHMEM_DISABLE_NVLS"] == "1"


def test_every_device_call_turns_multicast_off():
    """scripts/device_setup.sh, sourced by every device script, exports each of symm_mem.MULTICAST_OFF's settings
    (so a single-GPU call's processes have them too, not only the launcher's workers)."""
    import os
    import subprocess
    from pathlib import Path

    from fusiontune.kernels.symm_mem import MULTICAST_OFF

    setup = Path(__file__).resolve().parents[1] / "scripts" / "device_setup.sh"
    exports = [line for line in setup.read_text().splitlines() if line.startswith("export NCCL_NVLS_ENABLE")]
    assert len(exports) == 1
    shown = subprocess.run(["bash", "-c", f"{exports[0]}; env"], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"]}, check=True).stdout.splitlines()
    assert all(f"{key}={value}" in shown for key, value in MULTICAST_OFF.items())
