"""Two runs of the same configs, side by side: which got slower or faster beyond noise, and which broke.

Rows are matched by (config_id, tp, num_tokens): the same resolved PassConfig on the same model shape. Each run's
speedups are judged against its own all-off baseline (``report.speedups``): two machines of one kind, or one
machine on two days, differ in absolute latency (clocks, power caps, neighbours) by more than any fusion's gain,
while a speedup measured against the baseline beside it carries over. How far the absolute latency moved is shown
apart (``change``; the all-off rows say how far the machine moved).

A config is "slower" only when its speedup in B lies below A's interval and A's lies above B's, and the gap is
beyond the two intervals' joint uncertainty at a family-wise 5% (``family_z``: with 30 rows judged at 5% each, one
or two would be called slower by chance on every compare, and a CI gate that cries wolf gets switched off);
"faster" the other way round; "within noise" otherwise. A row labelled "not settled" is judged too: its interval
is an honest 95% one, only wider than ``measure.settle`` asked, so it can still say whether two runs differ (it is
not claimed as a speedup, in either run). The other labels (too noisy, busy host, lower clocks) mean the
measurement itself is in doubt: nothing to compare. A config that was ``ok`` and is now ``failed`` or
``incorrect`` is a regression whatever its speed, and so is a fusion that fired in A and no longer fires in B (its
speed would mean something else).

``agreement`` counts how the two runs' speedups repeat, two ways. "Inside": each run's speedup lies inside the
other's interval. For two honest 95% intervals of equal width this holds about 83% of the time, not 95%: the
difference of two estimates spreads sqrt(2) times wider than either, so the chance is P(|Z| < 1.96 / sqrt(2)).
"Joint": the two speedups differ by no more than their intervals' half-widths combined in quadrature, the test
that two measurements of one quantity agree at 95%, which honest intervals pass about 95% of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS

from .analysis import UNCLAIMED, speedups
from .results import RunFolder

KEY = ["config_id", "tp", "num_tokens"]
JUDGED_LABELS = ("not settled",)  # labels whose interval is still an honest one: compare judges these rows
JUDGED = ["label", "status", "latency_ms", "speedup", "ci_low", "ci_high", "verdict", "noise_floor", "is_baseline",
          "baseline_repeat"]


def compare(run_a: str | Path, run_b: str | Path) -> pd.DataFrame:
    """One row per config, TP size and num_tokens in both runs: both speedups with their intervals, the change in
    absolute latency, and a verdict (slower, faster, within noise, one of ``UNCLAIMED``, broke, fixed, stopped firing;
    "baseline" for the all-off rows, "no speedup" where neither run has one)."""
    a, b = RunFolder(run_a).table(), RunFolder(run_b).table()
    for name, table in (("A", a), ("B", b)):
        if table.empty:
            raise ValueError(f"run {name} holds no results")
    judged_a, judged_b = speedups(a), speedups(b)
    columns = KEY + JUDGED + [f"matches_{f}" for f in FUSION_FLAGS if f"matches_{f}" in a]
    merged = pd.merge(judged_a[[c for c in columns if c in judged_a]], judged_b[[c for c in columns if c in judged_b]],
                      on=KEY, suffixes=("_a", "_b"))
    merged["noise_floor"] = merged[["noise_floor_a", "noise_floor_b"]].max(axis=1, skipna=True)
    merged["change"] = merged["latency_ms_b"] / merged["latency_ms_a"] - 1
    merged["z"] = joint_z(merged)
    judged = merged["z"].notna() & ~merged["is_baseline_a"].astype(bool)
    threshold = family_z(int(judged.sum()))
    merged["verdict"] = [_verdict(row, threshold) for _, row in merged.iterrows()]
    merged = merged.rename(columns={"label_a": "label"}).drop(columns=["label_b"])
    return merged.sort_values(["verdict", "tp", "label", "num_tokens"]).reset_index(drop=True)


def joint_z(merged: pd.DataFrame) -> pd.Series:
    """Per row, how many standard errors apart the two speedups are: their difference over the two 95% half-widths
    combined in quadrature, divided by 1.96. Infinite where both intervals have no width and the speedups differ."""
    half_a = (merged["ci_high_a"] - merged["ci_low_a"]) / 2
    half_b = (merged["ci_high_b"] - merged["ci_low_b"]) / 2
    spread = (half_a ** 2 + half_b ** 2) ** 0.5 / 1.96
    gap = (merged["speedup_a"] - merged["speedup_b"]).abs()
    z = gap / spread.where(spread > 0)
    z[(spread == 0) & (gap == 0)] = 0.0
    z[(spread == 0) & (gap > 0)] = math.inf
    return z


def family_z(judged: int, alpha: float = 0.05) -> float:
    """The two-sided z a difference must pass so that, over ``judged`` rows, the chance of calling any of them
    slower or faster by noise alone stays within ``alpha`` (Bonferroni)."""
    return NormalDist().inv_cdf(1 - alpha / (2 * max(judged, 1)))


def _verdict(row, threshold: float) -> str:
    if row["status_a"] == "ok" and row["status_b"] != "ok":
        return f"broke ({row['status_b']})"
    if row["status_a"] != "ok" and row["status_b"] == "ok":
        return "fixed"
    if row["status_a"] != "ok":
        return "not measured"
    stopped = [f for f in FUSION_FLAGS if row.get(f"matches_{f}_a", 0) and not row.get(f"matches_{f}_b", 0)]
    if stopped:
        return f"stopped firing ({', '.join(stopped)})"
    if not row["verdict_a"] and not row["verdict_b"]:
        baseline = bool(row["is_baseline_a"]) or row.get("baseline_repeat_a") is True
        return "baseline" if baseline else "no speedup"
    unclaimed = [v for v in (row["verdict_a"], row["verdict_b"]) if v in UNCLAIMED and v not in JUDGED_LABELS]
    if unclaimed:
        return unclaimed[0]  # a measurement that carries no claim (analysis.UNCLAIMED): nothing to compare
    a, b = row["speedup_a"], row["speedup_b"]
    if pd.isna(a) or pd.isna(b):
        return "no speedup"
    apart = row["z"] > threshold
    if b < row["ci_low_a"] and a > row["ci_high_b"] and apart:
        return "slower"
    if b > row["ci_high_a"] and a < row["ci_low_b"] and apart:
        return "faster"
    return "within noise"


@dataclass(frozen=True)
class Agreement:
    """How two runs' speedups repeat (see the module doc), over the rows with a speedup in both (baselines left out)."""

    inside: int  # each speedup inside the other run's interval
    joint: int  # the two differ by no more than their half-widths combined in quadrature
    rows: int


def agreement(result: pd.DataFrame) -> Agreement:
    """Count, over rows with a speedup in both runs (labels or not; the baseline rows left out), those whose
    speedups lie inside each other's intervals, and those that agree within their joint 95% uncertainty."""
    both = result[result["speedup_a"].notna() & result["speedup_b"].notna() & (result["verdict"] != "baseline")]
    inside = ((both["speedup_a"] >= both["ci_low_b"]) & (both["speedup_a"] <= both["ci_high_b"])
              & (both["speedup_b"] >= both["ci_low_a"]) & (both["speedup_b"] <= both["ci_high_a"]))
    half_a = (both["ci_high_a"] - both["ci_low_a"]) / 2
    half_b = (both["ci_high_b"] - both["ci_low_b"]) / 2
    joint = [abs(a - b) <= math.hypot(ha, hb)
             for a, b, ha, hb in zip(both["speedup_a"], both["speedup_b"], half_a, half_b)]
    return Agreement(inside=int(inside.sum()), joint=int(sum(joint)), rows=len(both))


def regressions(result: pd.DataFrame) -> pd.DataFrame:
    """The rows a CI should fail on."""
    return result[result["verdict"].str.startswith(("slower", "broke", "stopped firing"))]
