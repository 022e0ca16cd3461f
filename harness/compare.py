"""Two runs of the same configs, side by side: which got slower or faster beyond noise, and which broke.

Rows are matched by (config_id, tp, num_tokens): the same resolved PassConfig on the same model shape. A change
counts only beyond the noise floor: the larger of the two runs' floors at that TP size and num_tokens (see
``report.noise_floor``; a run without a repeated baseline contributes its median's CI). A config that was ``ok``
and is now ``failed`` or ``incorrect`` is a regression whatever its speed, and so is a fusion that fired in A and
no longer fires in B (its speed would mean something else).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS

from .report import noise_floor
from .results import RunFolder

KEY = ["config_id", "tp", "num_tokens"]


def compare(run_a: str | Path, run_b: str | Path) -> pd.DataFrame:
    """One row per config, TP size and num_tokens in both runs: the two medians, the change, the floor, and a
    verdict (slower, faster, within noise, broke, fixed, stopped firing)."""
    a, b = RunFolder(run_a).table(), RunFolder(run_b).table()
    for name, table in (("A", a), ("B", b)):
        if table.empty:
            raise ValueError(f"run {name} holds no results")
    floors = pd.merge(_floors(a), _floors(b), on=["tp", "num_tokens"], how="outer", suffixes=("_a", "_b"))
    floors["noise_floor"] = floors[["noise_floor_a", "noise_floor_b"]].max(axis=1, skipna=True)
    columns = KEY + ["label", "status", "latency_ms"] + [f"matches_{f}" for f in FUSION_FLAGS if f"matches_{f}" in a]
    merged = pd.merge(a[[c for c in columns if c in a]], b[[c for c in columns if c in b]], on=KEY,
                      suffixes=("_a", "_b"))
    merged = merged.merge(floors[["tp", "num_tokens", "noise_floor"]], on=["tp", "num_tokens"], how="left")
    merged["change"] = merged["latency_ms_b"] / merged["latency_ms_a"] - 1
    merged["verdict"] = [_verdict(row) for _, row in merged.iterrows()]
    merged = merged.rename(columns={"label_a": "label"}).drop(columns=["label_b"])
    return merged.sort_values(["verdict", "tp", "label", "num_tokens"]).reset_index(drop=True)


def _floors(table: pd.DataFrame) -> pd.DataFrame:
    return noise_floor(table)[["tp", "num_tokens", "noise_floor"]]


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
    floor = row["noise_floor"] if pd.notna(row["noise_floor"]) else 0.0
    if row["change"] > floor:
        return "slower"
    if row["change"] < -floor:
        return "faster"
    return "within noise"


def regressions(result: pd.DataFrame) -> pd.DataFrame:
    """The rows a CI should fail on."""
    return result[result["verdict"].str.startswith(("slower", "broke", "stopped firing"))]
