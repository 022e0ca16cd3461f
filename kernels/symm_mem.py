"""Symmetric memory for the collectives, and which all-reduce runs at which size.

A serving engine does not call NCCL for a small all-reduce: vLLM runs its custom one-shot / two-shot all-reduce
(or torch's symmetric-memory ones) below a size bound and NCCL above it. fusiontune's all-off model must do the
same, or every collective fusion is measured against a baseline slower than any deployment's. So the unfused
``all_reduce`` op on CUDA picks, by size and TP size, torch's ``symm_mem`` one-shot, its two-shot, or NCCL
(``allreduce: auto``); ``symm-mem`` and ``nccl`` force one kind. The fused all-reduce + norm op picks fusiontune's
Triton kernel (``allreduce_backend: auto | fusiontune``), FlashInfer's (``flashinfer``, as vLLM runs it) or NCCL
followed by the norm kernel (``nccl``).

Workspaces are symmetric buffers made once per process group and purpose and kept for the life of the process:
rendezvous is a collective and costly, and a CUDA graph captured over a buffer keeps its addresses. A workspace
grows (a new one, the old one kept) only outside graph capture; every rank grows it at the same call, since every
rank runs the same graph. Each implementation that runs is recorded (``take_used``), so rows say what ran.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import implementations

MiB = 1024 * 1024
# NVLink multicast off in NCCL, torch's symmetric memory and NVSHMEM, in every process that runs collectives:
# multicast objects can take a shared host's GPUs out of service.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

ALLREDUCE_CHOICES = ("auto", "symm-mem", "nccl")
ALLREDUCE_BACKEND_CHOICES = ("auto", "fusiontune", "flashinfer", "nccl")

# Where each unfused all-reduce is the fastest, by TP size: the largest tensor (bytes) torch's symmetric-memory
# one-shot takes, and the largest its two-shot takes; NCCL above. Measured with bench-kernels --tp on 4 x H200
# (NVLink, 2026-11-28, docs/benchmarks.md): one-shot + norm was the best pair up to 1 MB at TP=2 and 0.5 MB at
# TP=4, two-shot + norm from there, and NCCL equal to two-shot at 64 MB. TP sizes not listed take the nearest
# smaller one (TP=8 is not measured: TP=4's values).
SYMM_MEM_ALLREDUCE_BOUNDS: dict[int, tuple[int, int]] = {
    2: (1 * MiB, 64 * MiB),
    4: (512 * 1024, 32 * MiB),
}
# fusiontune's fused all-reduce + norm kernel, by TP size and output ("none": the norm, "fp8": its FP8 codes): the
# largest tensor its one-shot form takes, and the largest its two-shot form takes; the unfused pair above.
# Measured with scripts/compare_allreduce_kernels.py on 4 x H200 (NVLink, 2026-11-28, eleventh session,
# docs/benchmarks.md), the two-shot without meetings: the one-shot fastest to 0.5 MB at TP=2 and to 0.25 MB at
# TP=4, the two-shot from there, faster than the best unfused pair at every size to 64 MB at both TP sizes.
# TP=2 was measured with the norm only; its FP8 bounds are the same (at TP=4 the two outputs timed alike).
FUSED_BOUNDS: dict[int, dict[str, tuple[int, int]]] = {
    2: {"none": (512 * 1024, 64 * MiB), "fp8": (512 * 1024, 64 * MiB)},
    4: {"none": (256 * 1024, 64 * MiB), "fp8": (256 * 1024, 64 * MiB)},
}
# The largest tensor a symmetric-memory path takes (a fused workspace holds two halves, each with the peers' slots
# of it, and a two-shot half its gather area too).
SYMM_MEM_MAX_BYTES = 64 * MiB


@dataclass
class CollectiveSettings:
    """Which implementations the collective ops use in this process (the sweep's ``collectives:``)."""

    allreduce: str = "auto"  # the unfused all-reduce: auto | symm-mem | nccl
    # the fused all-reduce + norm: auto (fusiontune's kernel where it measured faster, else the unfused pair),
    # fusiontune (the kernel at every size it holds), flashinfer (FlashInfer's kernel up to its workspace bound),
    # nccl (NCCL's all-reduce, then the norm kernel)
    allreduce_backend: str = "auto"

    def __post_init__(self):
        if self.allreduce not in ALLREDUCE_CHOICES:
            raise ValueError(f"collectives.allreduce must be one of {', '.join(ALLREDUCE_CHOICES)}, "
                             f"got {self.allreduce!r}")
        if self.allreduce_backend not in ALLREDUCE_BACKEND_CHOICES:
            raise ValueError(f"collectives.allreduce_backend must be one of {', '.join(ALLREDUCE_BACKEND_CHOICES)}, "
                             f"got {self.allreduce_backend!r}")


SETTINGS = CollectiveSettings()


def configure(settings: CollectiveSettings) -> None:
    global SETTINGS
    SETTINGS = settings


def record(implementation: str) -> None:
    """Note the collective implementation that ran (``implementations``, kind ``COLLECTIVE``)."""
    implementations.record(implementations.COLLECTIVE, implementation)


def used() -> set[str]:
    """The collective implementations run since the last ``take_used``, kept."""
    return implementations.used(implementations.COLLECTIVE)


def take_used() -> str:
    """The collective implementations run since the last call (comma-separated), and forget them."""
    return implementations.take(implementations.COLLECTIVE)


def _by_tp(table: dict[int, object], world: int):
    return table[max([tp for tp in table if tp <= world], default=min(table))]


_ENABLED: set[str] = set()


def ensure_group(group_name: str) -> None:
    """Older torch needs a group enabled for symmetric memory before its ops run (newer ones say it is no longer
    needed and do nothing)."""
    if group_name in _ENABLED:
        return
    from torch.distributed import _symmetric_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _symmetric_memory.enable_symm_mem_for_group(group_name)
    _ENABLED.add(group_name)


@dataclass
class Workspace:
    buffer: torch.Tensor  # uint8, symmetric
    handle: object  # torch's _SymmetricMemory: buffer_ptrs_dev, signal_pad_ptrs_dev, rank, world_size

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The workspace's first bytes as a tensor of ``shape`` (still symmetric: torch's ops take it)."""
        return self.buffer[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


_WORKSPACES: dict[tuple[str, str], list[Workspace]] = {}


def workspace(group_name: str, purpose: str, nbytes: int,
              prepare: Callable[[torch.Tensor], None] | None = None) -> Workspace:
    """A symmetric buffer of at least ``nbytes`` for ``purpose`` on this group (collective on first use and when
    it grows). Separate purposes get separate buffers, so their signal pads never mix. ``prepare`` fills a new
    buffer before any peer can write into it: every rank has finished its fill when the rendezvous returns."""
    held = _WORKSPACES.setdefault((group_name, purpose), [])
    if held and held[-1].nbytes >= nbytes:
        return held[-1]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"the {purpose} workspace must grow to {nbytes} bytes during CUDA graph capture; run the "
                           f"op once eagerly at this size first")
    from torch.distributed import _symmetric_memory

    ensure_group(group_name)
    size = max(MiB, 1 << (max(nbytes, 1) - 1).bit_length())
    buffer = _symmetric_memory.empty(size, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
    if prepare is not None:
        prepare(buffer)
        torch.cuda.current_stream().synchronize()
    handle = _symmetric_memory.rendezvous(buffer, group_name)
    held.append(Workspace(buffer, handle))  # the older ones stay: graphs captured over them may replay
    return held[-1]


def allreduce_method(nbytes: int, world: int, settings: CollectiveSettings | None = None) -> str:
    """Which unfused all-reduce a tensor of ``nbytes`` takes: "one-shot", "two-shot" or "nccl"."""
    settings = settings or SETTINGS
    if settings.allreduce == "nccl":
        return "nccl"
    one_shot_max, two_shot_max = _by_tp(SYMM_MEM_ALLREDUCE_BOUNDS, world)
    if settings.allreduce == "symm-mem":  # forced: one-shot where it is the better of the two, two-shot else
        return "one-shot" if nbytes <= one_shot_max else "two-shot" if nbytes <= SYMM_MEM_MAX_BYTES else "nccl"
    return "one-shot" if nbytes <= one_shot_max else "two-shot" if nbytes <= two_shot_max else "nccl"


def fused_method(nbytes: int, world: int, quant: bool, settings: CollectiveSettings | None = None) -> str:
    """Which fused all-reduce + norm (``quant``: + FP8 quant) a tensor of ``nbytes`` takes: "one-shot" or
    "two-shot" (fusiontune's kernel, where that form measured fastest), "flashinfer" (FlashInfer's kernel, with
    ``allreduce_backend: flashinfer``), or "unfused" (the all-reduce op, then the norm kernel).
    ``allreduce_backend: fusiontune`` takes our kernel, and ``flashinfer`` FlashInfer's, up to the workspace bound."""
    settings = settings or SETTINGS
    if settings.allreduce_backend == "nccl" or nbytes > SYMM_MEM_MAX_BYTES:
        return "unfused"
    if settings.allreduce_backend == "flashinfer":
        return "flashinfer"
    one_shot_max, two_shot_max = _by_tp(FUSED_BOUNDS, world)["fp8" if quant else "none"]
    if nbytes <= one_shot_max:
        return "one-shot"
    if settings.allreduce_backend == "fusiontune" or nbytes <= two_shot_max:
        return "two-shot"
    return "unfused"


def symm_mem_all_reduce(x: torch.Tensor, group_name: str, method: str) -> torch.Tensor:
    """``x`` summed over the group by torch's symmetric-memory one-shot or two-shot all-reduce (x is copied into
    the group's workspace first: the GEMM that produced it wrote ordinary memory)."""
    x = x.contiguous()
    space = workspace(group_name, "unfused all-reduce", x.numel() * x.element_size())
    staged = space.view(x.shape, x.dtype)
    if method == "one-shot":
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staged, x, "sum", group_name)
    staged.copy_(x)
    out = torch.empty_like(x)
    return torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", group_name, out)
