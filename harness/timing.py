"""Latency of one forward, summarised as median / p10 / p90.

On CUDA the forward is captured in a CUDA graph, as a serving engine runs a decode step: one graph calls it once on
each of a few copies of the input (so no copy is still in L2 from the call before), and events around each replay
give the device's own time per forward, free of Python and launch overhead. Where capture fails the forward is
timed eagerly between events, and the row says so. On CPU, ``perf_counter`` around each call. With TP > 1 every
rank starts each repeat after a barrier, and the step's latency is the slowest rank's (``combine_ranks``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


INPUT_COPIES = 4  # inputs a captured graph rotates through


def time_per_call(fn: Callable, input_sets: list, replays: int = 30, barrier=None) -> list[float]:
    """Microseconds per call, one value per replay of a CUDA graph that calls ``fn`` once on every input set (a
    ``barrier`` process group: every rank starts each replay together)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for inputs in input_sets[:3]:
            fn(inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inputs in input_sets:
            fn(inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        if barrier is not None:
            dist.barrier(group=barrier)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(input_sets))
    del graph
    return times


def time_forward(forward: Callable[[torch.Tensor], object], x: torch.Tensor, warmup: int, repeats: int,
                 device: torch.device, group=None) -> tuple[list[float], str]:
    """(milliseconds per forward of each of ``repeats`` repeats after ``warmup`` untimed calls, how it was timed)."""
    for _ in range(warmup):
        forward(x)
    if device.type == "cuda":
        copies = [x] + [x.clone() for _ in range(INPUT_COPIES - 1)]
        try:
            if group is not None:
                dist.barrier(group=group)
            times = time_per_call(forward, copies, replays=repeats, barrier=group)
            return [t / 1e3 for t in times], f"cuda-graph ({INPUT_COPIES} input copies)"
        except Exception as exc:  # noqa: BLE001 - a forward that cannot be captured is still timed, and said so
            torch.cuda.synchronize()
            how = f"eager events (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]})"
    else:
        how = "wall clock"
    return _time_eagerly(lambda: forward(x), repeats, device, group), how


def _time_eagerly(forward: Callable[[], object], repeats: int, device: torch.device, group=None) -> list[float]:
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
