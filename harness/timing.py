"""Latency of one forward: device-synchronised wall clock per repeat, summarised as median / p10 / p90.

On CUDA, events around the forward (the device's own clock); on CPU, ``perf_counter``. With TP > 1 every rank
starts each repeat after a barrier, and the step's latency is the slowest rank's (``combine_ranks``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


def time_forward(forward: Callable[[], object], warmup: int, repeats: int, device: torch.device,
                 group=None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            forward()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def combine_ranks(per_rank: list[list[float]]) -> list[float]:
    """A TP step ends when its slowest rank does: the per-repeat maximum over ranks."""
    return [max(values) for values in zip(*per_rank)]


def summarize(times_ms: list[float]) -> dict[str, float]:
    if not times_ms:
        return {"latency_ms": float("nan"), "latency_ms_p10": float("nan"), "latency_ms_p90": float("nan")}
    if len(times_ms) == 1:
        p10 = p90 = times_ms[0]
    else:
        deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return {"latency_ms": statistics.median(times_ms), "latency_ms_p10": p10, "latency_ms_p90": p90}
