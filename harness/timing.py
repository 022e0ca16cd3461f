"""Latency of one forward: repeated until its median is pinned down, summarised as median, p10, p90, CV.

On CUDA the forward is captured in a CUDA graph, as a serving engine runs a decode step: one graph calls it once on
each of a few copies of the input (so no copy is still in L2 from the call before; one where the input alone is
twice the L2), and events around each replay give the device's own time per forward, free of Python and launch
overhead. Before each replay the GPU spins for a while, so the start event, the graph launch and the end event are all queued before the start event fires: a
late host thread then cannot leave the GPU idle inside the timed span. Replays run for ``WARM_MS`` before any is
kept, so clocks and caches settle at each size. Where capture fails the forward is timed eagerly between events,
and the row says so. On CPU, ``perf_counter`` around each call.

How many repeats: batches of ``min_repeats`` until the median's 95% confidence interval (order statistics, no
assumption about the distribution) is within ``settle`` of the median, or ``max_repeats`` is reached; the row
records the count and whether it settled. With TP > 1 every rank starts each repeat after a barrier (on the GPU
too: see ``GraphTimer.sample``), a repeat lasts as long as its slowest rank, and the ranks share those times before
deciding, so all stop together.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


INPUT_COPIES = 4  # the most inputs a captured graph rotates through (``input_copies``)
WARM_MS = 200.0  # untimed replays first, at least this long
RECAPTURE_WARM_MS = 5.0  # untimed replays of a fresh capture in paired rounds (the GPU is warm by then)
MAX_WARM_REPLAYS = 20_000
SPIN_CYCLES = 2_000_000  # the GPU's busy-wait before each timed replay (about 1 ms at H100 clocks)
ROUND_REPEATS = 5  # timed forwards of each config per round of a paired measurement
MIN_ROUNDS = 6  # the fewest rounds whose median has a 95% interval from order statistics


@dataclass(frozen=True)
class Repeats:
    """When to stop repeating (the sweep's ``measure:`` section)."""

    min_repeats: int = 20
    max_repeats: int = 200
    settle: float = 0.005  # the median's 95% CI half-width, relative to the median


class GraphTimer:
    """A CUDA graph that calls ``fn`` once on every input set, replayed between events."""

    def __init__(self, fn: Callable, input_sets: list, prime: bool = True):
        if prime:  # a few eager calls on a side stream first, as capture wants (not needed again for a recapture)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for inputs in input_sets[:3]:
                    fn(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        self.calls = len(input_sets)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for inputs in input_sets:
                fn(inputs)
        self.graph.replay()
        torch.cuda.synchronize()

    def warm(self, milliseconds: float = WARM_MS, group=None) -> None:
        """Replay, untimed, for ``milliseconds``. With a process group (a graph holding collectives) every rank
        must replay as often as its peers, or one rank's extra replay waits forever for partners: the ranks time
        one replay, agree on the largest count it implies, and replay exactly that many times."""
        if group is None:
            t0 = time.perf_counter()
            while (time.perf_counter() - t0) * 1e3 < milliseconds:
                self.graph.replay()
                torch.cuda.synchronize()
            return
        t0 = time.perf_counter()
        self.graph.replay()
        torch.cuda.synchronize()
        once_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        count = torch.tensor([min(MAX_WARM_REPLAYS, math.ceil(milliseconds / once_ms))], device="cuda")
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        for _ in range(int(count.item()) - 1):
            self.graph.replay()
        torch.cuda.synchronize()

    def sample(self, replays: int, barrier=None) -> list[float]:
        """Microseconds per call, one value per replay (``barrier``: a process group whose ranks start each
        replay together). With a group, the ranks' GPUs leave the spin through a one-element all-reduce, so every
        rank's start event fires within that collective's skew: a host barrier alone leaves the ranks tens of
        microseconds apart, and the early rank's kernels then wait for the late one inside the timed span."""
        times = []
        aligner = torch.zeros(1, device="cuda") if barrier is not None else None
        for _ in range(replays):
            if barrier is not None:
                dist.barrier(group=barrier)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SPIN_CYCLES)  # keeps the GPU busy while the host queues what follows
            if aligner is not None:
                dist.all_reduce(aligner, group=barrier)
            start.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.calls)
        return times


def time_per_call(fn: Callable, input_sets: list, replays: int = 30, barrier=None,
                  warm_ms: float = 25.0) -> list[float]:
    """Microseconds per call of ``fn`` under a CUDA graph, one value per replay (bench-kernels' timer: a
    kernel's graph replays in microseconds, so a short warm-up already runs it thousands of times)."""
    timer = GraphTimer(fn, input_sets)
    try:
        timer.warm(warm_ms, barrier)
        return timer.sample(replays, barrier)
    finally:
        del timer.graph


def time_forward(forward: Callable[[torch.Tensor], object], x: torch.Tensor, warmup: int, repeats: Repeats,
                 device: torch.device, group=None) -> tuple[list[float], str]:
    """(milliseconds per forward of each repeat after ``warmup`` untimed calls, how it was timed)."""
    for _ in range(warmup):
        forward(x)
    (sample,), how = _samplers((forward,), x, device, group)
    return until_settled(sample, repeats, device, group), how


def time_rounds(forwards: Sequence[Callable[[torch.Tensor], object]], partner: Callable[[torch.Tensor], object],
                x: torch.Tensor, warmup: int, repeats: Repeats, device: torch.device, group=None,
                seed: int = 0) -> tuple[list[list[float]], list[float], str]:
    """(milliseconds per forward of each of ``forwards``, of ``partner`` (all-off), how they were timed): rounds of
    ``ROUND_REPEATS`` forwards of each, in an order drawn anew every round (from ``seed``: every rank draws the
    same), so that drift moves them all alike. Rounds come in batches; a forward leaves once the 95% interval of its
    median round ratio over all-off (``paired_speedup``) is within ``settle`` of it, or at ``max_repeats``, and
    all-off runs in every round while any is left, so each forward's rounds line up with all-off's first ones."""
    everything = [*forwards, partner]
    for fn in everything:
        for _ in range(warmup):
            fn(x)
    samplers, how = _samplers(everything, x, device, group, recapture=True)
    base = len(forwards)
    times: list[list[float]] = [[] for _ in everything]
    order = random.Random(seed)
    least = max(MIN_ROUNDS, math.ceil(repeats.min_repeats / ROUND_REPEATS))
    most = max(least, math.ceil(repeats.max_repeats / ROUND_REPEATS))
    left, rounds = list(range(base)), 0
    while left and rounds < most:
        batch = min(least, most - rounds)
        taking = [*left, base]
        mine: dict[int, list[float]] = {which: [] for which in taking}
        for _ in range(batch):
            for which in order.sample(taking, len(taking)):
                mine[which].extend(samplers[which](ROUND_REPEATS))
        for which in taking:  # the same order on every rank: each is a collective with TP > 1
            times[which].extend(slowest_rank(mine[which], device, group))
        rounds += batch
        left = [which for which in left if not interval_settled(*paired_speedup(times[which], times[base]),
                                                                repeats.settle)]
    return times[:base], times[base], f"paired rounds of {ROUND_REPEATS} with all-off, {how}"


def interval_settled(value: float, low: float, high: float, settle: float) -> bool:
    """Whether a 95% interval's half-width is within ``settle`` of its value (``measure.settle``)."""
    return (high - low) / 2 <= settle * value


def input_copies(x: torch.Tensor) -> int:
    """How many copies of the input a captured graph rotates through: enough that together they hold twice the
    GPU's L2, so that the copy a call reads is no longer there from its previous call, and at most
    ``INPUT_COPIES``. An input that large alone needs no other: 16384 tokens of hidden 4096 in bf16 are 128 MB
    against an H200's 50 MB of L2, and every replay of four copies there cost four forwards of about 90 ms (a
    paired round of six configs at 16384 tokens, by that count about 11 s: the fifteenth session's sweep did not
    finish that size in six minutes)."""
    l2 = torch.cuda.get_device_properties(x.device).L2_cache_size
    return max(1, min(INPUT_COPIES, math.ceil(2 * l2 / max(1, x.numel() * x.element_size()))))


def _samplers(forwards, x: torch.Tensor, device: torch.device, group=None,
              recapture: bool = False) -> tuple[list[Callable], str]:
    """A sampler per forward (``n`` -> n times in ms), and how they time: on CUDA each forward captured in a CUDA
    graph over ``input_copies`` copies of ``x`` and warmed (eager events where capture fails), else wall clock.
    ``recapture``: every call after the first times a fresh capture (``_Recapturing``)."""
    if device.type == "cuda":
        copies = [x] + [x.clone() for _ in range(input_copies(x) - 1)]
        try:
            if group is not None:
                dist.barrier(group=group)
            timers = [GraphTimer(forward, copies) for forward in forwards]
            for timer in timers:
                timer.warm(group=group)
        except Exception as exc:  # noqa: BLE001 - a forward that cannot be captured is still timed, and said so
            torch.cuda.synchronize()
            how = f"eager events (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]})"
        else:
            if recapture:
                return ([_Recapturing(forward, copies, timer, group) for forward, timer in zip(forwards, timers)],
                        f"cuda-graph ({len(copies)} input copies, captured afresh each round)")
            return ([lambda n, t=timer: [v / 1e3 for v in t.sample(n, group)] for timer in timers],
                    f"cuda-graph ({len(copies)} input copies)")
    else:
        how = "wall clock"
    return [lambda n, f=forward: _time_eagerly(lambda: f(x), n, device, group) for forward in forwards], how


class _Recapturing:
    """A sampler that times each call's repeats on a fresh CUDA-graph capture of its forward. Captures of one
    compiled forward replay at steadily different speeds, up to 1.7% apart at 1-64 tokens on an H200 (where their
    buffers land; separate compiles differ no more: scripts/probe_instances.py), so a capture is a sample too:
    a round on a capture of its own makes the interval over rounds hold that spread, and two runs agree within it.
    The old capture is dropped only once the new one exists, so the new one's buffers land elsewhere."""

    def __init__(self, forward: Callable, copies: list, timer: GraphTimer, group=None):
        self.forward, self.copies, self.timer, self.group = forward, copies, timer, group
        self.used = False

    def __call__(self, n: int) -> list[float]:
        if self.used:
            fresh = GraphTimer(self.forward, self.copies, prime=False)
            fresh.warm(RECAPTURE_WARM_MS, self.group)
            self.timer = fresh  # the old graph goes; its memory returns once the allocator frees its pool
        self.used = True
        return [v / 1e3 for v in self.timer.sample(n, self.group)]


def paired_speedup(config_ms: list[float], base_ms: list[float]) -> tuple[float, float, float]:
    """(the median over rounds of all-off's median / the config's, its 95% interval): rounds are the independent
    samples (within a round both saw the same machine), and the interval is the median's from order statistics
    (``median_ci``): distribution-free, exact for any number of rounds, infinite below 6. A percentile bootstrap
    over so few rounds covers less than it claims (the A/A pair missed 1 at 3 of 12 sizes on an H200)."""
    ratios = round_ratios(config_ms, base_ms)
    if not ratios:
        return float("nan"), -math.inf, math.inf
    low, high = median_ci(ratios)
    return statistics.median(ratios), low, high


def round_ratios(config_ms: list[float], base_ms: list[float]) -> list[float]:
    """Per round of ``ROUND_REPEATS`` each: all-off's median / the config's."""
    k = ROUND_REPEATS
    return [statistics.median(base_ms[i:i + k]) / statistics.median(config_ms[i:i + k])
            for i in range(0, min(len(config_ms), len(base_ms)) - k + 1, k)]


def until_settled(sample: Callable[[int], list[float]], repeats: Repeats, device: torch.device,
                  group=None) -> list[float]:
    """Batches of ``sample(n)`` (each rank's times, shared as the per-repeat slowest) until the median settles."""
    times: list[float] = []
    while len(times) < repeats.max_repeats:
        batch = sample(min(repeats.min_repeats, repeats.max_repeats - len(times)))
        times += slowest_rank(batch, device, group)
        low, high = median_ci(times)
        if interval_settled(statistics.median(times), low, high, repeats.settle):
            break
    return times


def slowest_rank(times: list[float], device: torch.device, group=None) -> list[float]:
    """Per repeat, the slowest rank's time, on every rank (a TP step ends when its slowest rank does)."""
    if group is None or dist.get_world_size(group) == 1:
        return times
    shared = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
    return shared.tolist()


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


def median_ci(times: list[float]) -> tuple[float, float]:
    """The median's 95% confidence interval from order statistics (ranks n/2 -/+ 0.98 sqrt(n)); infinite below
    6 samples, where no pair of order statistics covers the median with 95% confidence."""
    n = len(times)
    if n < 6:
        return -math.inf, math.inf
    ordered = sorted(times)
    half_width = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half_width))
    high = min(n - 1, math.ceil(n / 2 + half_width) - 1)
    return ordered[low], ordered[high]


def combine_ranks(per_rank: list[list[float]]) -> list[float]:
    """A TP step ends when its slowest rank does: the per-repeat maximum over ranks."""
    return [max(values) for values in zip(*per_rank)]


SUMMARY_COLUMNS = ("latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_ms_cv", "latency_ms_ci_low",
                   "latency_ms_ci_high")


def summarize(times_ms: list[float], settle: float | None = None) -> dict[str, float]:
    """Median, p10, p90, coefficient of variation, the median's 95% CI, the repeat count, and (given the
    ``settle`` target) whether that CI got within it."""
    if not times_ms:
        return {**{column: float("nan") for column in SUMMARY_COLUMNS}, "repeats": 0, "settled": False}
    median = statistics.median(times_ms)
    if len(times_ms) == 1:
        p10 = p90 = times_ms[0]
    else:
        deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    mean = statistics.fmean(times_ms)
    cv = statistics.stdev(times_ms) / mean if len(times_ms) > 1 and mean > 0 else float("nan")
    low, high = median_ci(times_ms)
    settled = settle is not None and interval_settled(median, low, high, settle)
    return {"latency_ms": median, "latency_ms_p10": p10, "latency_ms_p90": p90, "latency_ms_cv": cv,
            "latency_ms_ci_low": low, "latency_ms_ci_high": high, "repeats": len(times_ms), "settled": settled}


def _power_limit_w(device: torch.device) -> float:
    """The power limit the GPU enforces (W), through the NVML handle torch's own ``clock_rate`` reads."""
    import pynvml
    from torch.cuda import _get_pynvml_handler  # private, in torch 2.11 and 2.13 alike

    return pynvml.nvmlDeviceGetEnforcedPowerLimit(_get_pynvml_handler(device)) / 1000


def gpu_state(device: torch.device) -> dict[str, float]:
    """The GPU's SM clock (MHz), temperature (C), power (W) and enforced power limit (W) now, through NVML; empty
    where it cannot say. Sampled right after a size's timed replays, they tell a clock or thermal drift from a real
    difference, and a capped machine from another of its kind."""
    if device.type != "cuda":
        return {}
    state = {}
    for column, read in (("gpu_sm_clock_mhz", torch.cuda.clock_rate), ("gpu_temp_c", torch.cuda.temperature),
                         ("gpu_power_w", lambda d: torch.cuda.power_draw(d) / 1000),
                         ("gpu_power_limit_w", _power_limit_w)):
        try:
            state[column] = float(read(device))
        except Exception:  # noqa: BLE001 - no NVML bindings, or a GPU that does not report it
            pass
    return state
