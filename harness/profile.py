"""Where a forward's time goes: a torch.profiler trace, and its time filed by what each kernel does.

A kernel is filed under the fusiontune op that launched it (``kernels.library.OP_CATEGORY``: rms_norm, quant,
fused rms+quant, ...), so a Triton kernel that serves several ops is told apart by its caller, not its name.
Kernels no fusiontune op launched (cuBLAS, NCCL, the Triton or C++ code Inductor wrote around our ops) are filed
by their aten op or their name: gemm, collective, or other. On CUDA the time is the kernels' device time; on CPU
it is each op's self time on the host, so categories still add up to the forward.

The forward runs eagerly here (no CUDA graph): each kernel's own duration is what a graph replays, and eager
launches keep the op that launched each kernel visible to the profiler. The trace is Chrome-trace JSON, gzipped,
which Perfetto (ui.perfetto.dev) and chrome://tracing open as they are.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections import defaultdict
from typing import Callable

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from fusiontune.kernels.library import OP_CATEGORY, NAMESPACE

PREFIX = f"{NAMESPACE}::"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm", "aten::matmul", "aten::linear")
GEMM_KERNEL_HINTS = ("gemm", "cutlass", "xmma", "cublas", "nvjet", "sm90_", "sm100_")
COLLECTIVE_HINTS = ("nccl", "c10d::", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter")


def category_of(op_name: str, kernel_name: str = "") -> str:
    """The category of time spent in ``op_name`` (the outermost fusiontune op around it, else the op itself)."""
    if op_name.startswith(PREFIX):
        return OP_CATEGORY.get(op_name[len(PREFIX):].split(".")[0], "other")
    names = f"{op_name} {kernel_name}".lower()
    if op_name in GEMM_OPS or any(h in kernel_name.lower() for h in GEMM_KERNEL_HINTS):
        return "gemm"
    if any(h in names for h in COLLECTIVE_HINTS):
        return "collective"
    return "other"


def _owner(event: FunctionEvent) -> FunctionEvent:
    """The outermost fusiontune op enclosing ``event`` (itself included), or ``event`` where there is none."""
    owner, node = event, event
    while node is not None:
        if node.name.startswith(PREFIX):
            owner = node
        node = node.cpu_parent
    return owner


def kernel_times(events: list[FunctionEvent], forwards: int, on_device: bool) -> list[dict]:
    """Per (category, owning op, kernel): microseconds and calls per forward."""
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or event.is_async:
            continue
        owner = _owner(event)
        if on_device:
            for kernel in event.kernels:
                key = (category_of(owner.name, kernel.name), owner.name, kernel.name)
                totals[key][0] += kernel.duration
                totals[key][1] += 1
        elif event.self_cpu_time_total > 0:
            key = (category_of(owner.name), owner.name, event.name)
            totals[key][0] += event.self_cpu_time_total
            totals[key][1] += 1
    return [{"category": c, "op": op, "kernel": k, "us_per_forward": t / forwards, "calls_per_forward": n / forwards}
            for (c, op, k), (t, n) in sorted(totals.items())]


def profile_forward(forward: Callable[[], object], device: torch.device, forwards: int = 3,
                    barrier: Callable[[], None] | None = None) -> tuple[list[dict], bytes]:
    """(kernel_times of ``forwards`` eager calls, the gzipped Chrome trace)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    forward()  # a warm call outside the trace (lazy initialisations, allocator growth)
    if on_device:
        torch.cuda.synchronize()
    if barrier:
        barrier()
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            forward()
        if on_device:
            torch.cuda.synchronize()
    rows = kernel_times(list(prof.events()), forwards, on_device)
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path, "rb") as f:
            trace = gzip.compress(f.read(), compresslevel=6)
    finally:
        os.unlink(path)
    return rows, trace
