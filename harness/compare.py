"""Two runs of the same configs, side by side: which got slower or faster beyond noise, and which broke.

Rows are matched by (config_id, tp, num_tokens): the same resolved PassConfig on the same model shape. Each run's
speedups are judged against its own all-off baseline (``report.speedups``): two machines of one kind, or one
machine on two days, differ in absolute latency (clocks, power caps, neighbours) by more than any fusion's gain,
while a speedup measured against the baseline beside it carries over. So a config is "slower" only when its
speedup in B lies below A's interval and A's lies above B's, "faster" the other way round, and "within noise"
otherwise. How far the absolute latency moved is shown apart (``change``; the all-off rows say how far the machine
moved). A config that was ``ok`` and is now ``failed`` or ``incorrect`` is a regression whatever its speed, and so
is a fusion that fired in A and no longer fires in B (its speed would mean something else).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS

from .analysis import UNCLAIMED, speedups
from .results import RunFolder

KEY = ["config_id", "tp", "num_tokens"]
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
    merged["verdict"] = [_verdict(row) for _, row in merged.iterrows()]
    merged = merged.rename(columns={"label_a": "label"}).drop(columns=["label_b"])
    return merged.sort_values(["verdict", "tp", "label", "num_tokens"]).reset_index(drop=True)


def _verdict(row) -> str:
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
    unclaimed = [v for v in (row["verdict_a"], row["verdict_b"]) if v in UNCLAIMED]
    if unclaimed:
        return unclaimed[0]  # a measurement that carries no claim (analysis.UNCLAIMED): nothing to compare
    a, b = row["speedup_a"], row["speedup_b"]
    if pd.isna(a) or pd.isna(b):
        return "no speedup"
    if b < row["ci_low_a"] and a > row["ci_high_b"]:
        return "slower"
    if b > row["ci_high_a"] and a < row["ci_low_b"]:
        return "faster"
    return "within noise"


def agreement(result: pd.DataFrame) -> tuple[int, int]:
    """(rows whose speedup in each run lies inside the other run's interval, rows with a speedup in both): whether a
    run repeats within what it claims, labels or not. The baseline rows are left out."""
    both = result[result["speedup_a"].notna() & result["speedup_b"].notna() & (result["verdict"] != "baseline")]
    inside = ((both["speedup_a"] >= both["ci_low_b"]) & (both["speedup_a"] <= both["ci_high_b"])
              & (both["speedup_b"] >= both["ci_low_a"]) & (both["speedup_b"] <= both["ci_high_a"]))
    return int(inside.sum()), len(both)


def regressions(result: pd.DataFrame) -> pd.DataFrame:
    """The rows a CI should fail on."""
    return result[result["verdict"].str.startswith(("slower", "broke", "stopped firing"))]
