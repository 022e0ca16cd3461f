"""The timing statistics every row is built from (harness/timing.py): the median's confidence interval, the
summary of a row's repeats, when repeating stops, and how ranks combine."""

from __future__ import annotations

import math
import random
import statistics

import torch

from fusiontune.harness.timing import (ROUND_REPEATS, Repeats, combine_ranks, input_copies, median_ci, paired_speedup,
                                       round_ratios, summarize, time_rounds, until_settled)


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


def test_a_paired_speedup_sees_through_drift_that_moves_both_alike():
    """Rounds on a machine whose speed swings between 1x and 2x: each round's all-off / config ratio is the true
    1.25 (1% noise), so the interval over rounds is tight around it; the same distribution paired with itself
    (A/A) covers 1; with fewer than 6 rounds there is no interval."""
    rng = random.Random(5)
    config, base, again = [], [], []
    for r in range(12):
        drift = 1 + math.sin(r) ** 2
        base += [drift * rng.uniform(0.99, 1.01) for _ in range(ROUND_REPEATS)]
        again += [drift * rng.uniform(0.99, 1.01) for _ in range(ROUND_REPEATS)]
        config += [drift / 1.25 * rng.uniform(0.99, 1.01) for _ in range(ROUND_REPEATS)]
    speedup, low, high = paired_speedup(config, base)
    assert abs(speedup - 1.25) < 0.01 and 1.22 < low <= speedup <= high < 1.28
    same, low, high = paired_speedup(again, base)
    assert low <= 1 <= high and high - low < 0.02
    assert len(round_ratios(config, base)) == 12
    assert paired_speedup(config[:10], base[:10])[1:] == (-math.inf, math.inf)


def test_paired_rounds_alternate_in_an_order_drawn_every_round():
    """Warm-up of each, then rounds of ROUND_REPEATS forwards of one and then the other, the order drawn anew each
    round, until the cap when the ratio never settles."""
    calls = []

    def forward(name):
        return lambda x: calls.append(name)

    (config_ms,), base_ms, how = time_rounds([forward("config")], forward("base"), torch.zeros(1), 2,
                                             Repeats(10, 40, 1e-12), torch.device("cpu"))
    assert calls[:4] == ["config", "config", "base", "base"] and how.startswith("paired rounds of 5 with all-off")
    rounds = [calls[4 + 2 * ROUND_REPEATS * i:4 + 2 * ROUND_REPEATS * (i + 1)] for i in range(8)]
    assert len(calls) == 4 + 8 * 2 * ROUND_REPEATS and len(config_ms) == len(base_ms) == 8 * ROUND_REPEATS
    for one in rounds:
        assert one[:ROUND_REPEATS] == [one[0]] * ROUND_REPEATS and set(one) == {"config", "base"}
    assert {one[0] for one in rounds} == {"config", "base"}  # both orders occur


def test_configs_timed_together_share_all_offs_rounds_and_each_leaves_once_settled(monkeypatch):
    """Three configs in rounds with all-off: a steady one settles after the first batch of 6 rounds and leaves; a
    scattered one stays to the cap; all-off runs in every round, so each config's rounds line up with its first
    ones. Every round holds each config still in, once, in shuffled order."""
    rng = random.Random(3)
    speed = {"steady": lambda: 0.5, "scattered": lambda: rng.choice((0.5, 2.0)), "also": lambda: 0.8,
             "base": lambda: 1.0}
    calls = []

    def forward(name):
        return lambda x: calls.append(name)

    # the wall clock's stand-in: each call takes its config's time
    monkeypatch.setattr("fusiontune.harness.timing._time_eagerly",
                        lambda fn, n, device, group=None: [fn() or speed[calls[-1]]() for _ in range(n)])
    names = ["steady", "scattered", "also"]
    per_config, base_ms, _ = time_rounds([forward(n) for n in names], forward("base"), torch.zeros(1), 0,
                                         Repeats(15, 60, 0.01), torch.device("cpu"))
    steady, scattered, also = per_config
    assert len(steady) == len(also) == 6 * ROUND_REPEATS  # settled after the first batch of rounds
    assert len(scattered) == len(base_ms) == 12 * ROUND_REPEATS  # never settles: to max_repeats
    assert paired_speedup(steady, base_ms)[0] == 2.0 and paired_speedup(also, base_ms)[0] == 1.25
    first_rounds = [calls[i:i + 4 * ROUND_REPEATS] for i in range(0, 3 * 4 * ROUND_REPEATS, 4 * ROUND_REPEATS)]
    assert all(sorted(set(r)) == sorted(names + ["base"]) for r in first_rounds)
    assert len({tuple(dict.fromkeys(r)) for r in first_rounds}) > 1  # the order is drawn anew
    later = calls[6 * 4 * ROUND_REPEATS:]
    assert set(later) == {"scattered", "base"}



def test_a_graph_rotates_through_input_copies_until_they_hold_twice_the_l2(monkeypatch):
    """Four copies of a small input, fewer as it grows, one where it alone is twice the L2 (an H200's 50 MB: 16384
    tokens of hidden 4096 in bf16), so that a replay at a large size costs one forward, not four."""
    class Props:
        L2_cache_size = 50 << 20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    hidden = torch.empty(0, 4096, dtype=torch.bfloat16)
    copies = {t: input_copies(hidden.new_empty(t, 4096)) for t in (1, 4096, 8192, 12800, 16384)}
    assert copies == {1: 4, 4096: 4, 8192: 2, 12800: 1, 16384: 1}
