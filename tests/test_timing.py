"""The timing statistics every row is built from (harness/timing.py): the median's confidence interval, the
summary of a row's repeats, when repeating stops, and how ranks combine."""

from __future__ import annotations

import math
import random
import statistics

import torch

from fusiontune.harness.timing import Repeats, combine_ranks, median_ci, summarize, until_settled


def test_the_median_interval_is_a_pair_of_order_statistics():
    assert median_ci([1.0] * 5) == (-math.inf, math.inf)  # too few samples for any 95% pair
    times = [float(v) for v in range(100, 0, -1)]  # order does not matter
    assert median_ci(times) == (41.0, 60.0)  # ranks 50 -/+ 0.98 sqrt(100), zero-based 40 and 59


def test_the_median_interval_covers_the_true_median_95_percent_of_the_time():
    """Exponential samples (skewed, like latencies), whose median is ln 2: the interval covers it in about 95% of
    2000 draws of 50 (binomial spread at that count: about +/-1%)."""
    rng = random.Random(19)
    covered = 0
    for _ in range(2000):
        low, high = median_ci([rng.expovariate(1.0) for _ in range(50)])
        covered += low <= math.log(2) <= high
    assert 0.93 <= covered / 2000 <= 0.98


def test_a_summary_gives_median_deciles_spread_and_whether_it_settled():
    times = [float(v) for v in range(1, 21)]
    row = summarize(times, settle=0.5)
    assert row["latency_ms"] == 10.5 and row["repeats"] == 20
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    assert (row["latency_ms_p10"], row["latency_ms_p90"]) == (deciles[0], deciles[-1])
    assert math.isclose(row["latency_ms_cv"], statistics.stdev(times) / statistics.fmean(times))
    low, high = median_ci(times)
    assert (row["latency_ms_ci_low"], row["latency_ms_ci_high"]) == (low, high) and row["settled"]
    assert not summarize(times, settle=0.01)["settled"]  # a half-width of 3 is not within 1% of 10.5
    one = summarize([2.0], settle=0.5)
    assert one["latency_ms_p10"] == one["latency_ms_p90"] == 2.0 and math.isnan(one["latency_ms_cv"])
    assert not one["settled"]  # one sample has no interval
    empty = summarize([])
    assert empty["repeats"] == 0 and math.isnan(empty["latency_ms"]) and not empty["settled"]


def test_repeating_stops_when_the_median_settles_or_at_the_cap():
    asked = []

    def steady(n):
        asked.append(n)
        return [1.0] * n

    assert until_settled(steady, Repeats(10, 200, 0.005), torch.device("cpu")) == [1.0] * 10 and asked == [10]
    rng = random.Random(3)
    asked.clear()

    def noisy(n):
        asked.append(n)
        return [rng.choice((1.0, 3.0)) for _ in range(n)]

    times = until_settled(noisy, Repeats(10, 35, 0.005), torch.device("cpu"))
    assert len(times) == 35 and asked == [10, 10, 10, 5]  # never settles: batches up to the cap, the last cut


def test_a_tp_step_lasts_as_long_as_its_slowest_rank():
    assert combine_ranks([[1.0, 5.0, 2.0], [3.0, 4.0, 2.5]]) == [3.0, 5.0, 2.5]
