"""The analysis of a run's rows: the noise floor, each speedup with its interval and verdict, and runs pooled.
Report, compare, export, the per-range plan and the tuner all read these numbers from here; the report only
renders them.

Speedup is the all-off baseline's median latency over the config's, at the same TP size and num_tokens. It is
given only where it means something: the config ran (``ok``), matched the baseline's output, and every fusion it
enables actually fired (nonzero match count). Otherwise the row's note says why there is no number. A fusion that
fired but whose op ran no fused kernel at that size (the attention + quant op from
``attention.SDPA_QUANT_MIN_TOKENS``, where cuDNN's attention and the quant kernel are the faster pair) counts as off
there, as one outside its range does: its row says so, and its speedup, if any, is the other fusions'.

The noise floor at a num_tokens is the larger of two things: how far the baseline's two measurements (first and
last in the sweep) disagree, and the half-width of the baseline median's 95% confidence interval, both relative.

A speedup is claimed ("faster", "slower") only when its interval excludes 1 and it is beyond the floor. The
interval comes from the two medians' 95% confidence intervals (baseline's low over the config's high, and the
reverse), widened by the baseline's drift between its two measurements: what the same config moved by during the
run. Otherwise the verdict is "within noise". A measurement that cannot carry a claim is labelled and never
claimed, whatever its median says (``UNCLAIMED``): "too noisy" where the config's or baseline's repeats scatter by
more than ``NOISY_CV`` (a machine under load); "not settled" where either one's median interval did not narrow to
``measure.settle`` within ``max_repeats`` (such claims moved between machines); "busy host" where the host's CPUs
were busy with other work (``BUSY_HOST_CPUS`` or more, ``host_load``) while the config or its baseline was timed
and the timing waits on the host (not a CUDA-graph replay); "lower clocks" where the config ran at an SM clock
``CLOCK_DROP`` below its baseline's (a power cap, a neighbour: the speedup is partly the clock's).

A paired row (``measure.paired``: the config timed in shared rounds with all-off, in one process) has its own
speedup, the median of the rounds' ratios, and its own interval (order statistics over rounds): drift between the
sweep's first and last all-off does not touch it, so it is judged by that interval alone (its all-off ran in the
same rounds, so neither all-off's first measurement nor its clocks enter), and the A/A check is all-off again
paired with all-off.
"""

from __future__ import annotations

import pandas as pd

from fusiontune.kernels.attention import SDPA_THEN_QUANT
from fusiontune.passes.fusions import FUSION_FLAGS, PASSES_BY_FLAG
from fusiontune.passes.ranges import INDIVISIBLE


def noise_floor(table: pd.DataFrame) -> pd.DataFrame:
    """Per (tp, num_tokens): the baseline's two medians, their relative drift, its CI half-width, the floor; and
    the first baseline measurement's median CI (``base_ci_low``, ``base_ci_high``) and CV (``base_cv``), which a
    speedup's interval is made from."""
    ok = table[table["status"] == "ok"]
    first = ok[ok["is_baseline"].astype(bool)]
    again = ok[flag(ok, "baseline_repeat")]
    keys = ["tp", "num_tokens"]
    floor = first[keys + ["latency_ms"]].rename(columns={"latency_ms": "baseline_ms"})
    floor["baseline_clock"] = column(first, "gpu_sm_clock_mhz").values
    half_width = (column(first, "latency_ms_ci_high") - column(first, "latency_ms_ci_low")) / 2
    floor["ci_rel"] = (half_width / first["latency_ms"]).values
    floor["base_ci_low"] = column(first, "latency_ms_ci_low").values
    floor["base_ci_high"] = column(first, "latency_ms_ci_high").values
    floor["base_cv"] = column(first, "latency_ms_cv").values
    floor["base_settled"] = column(first, "settled", True).values
    floor["base_host_other"] = column(first, "host_other_cpus").values
    again = again.assign(again_clock=column(again, "gpu_sm_clock_mhz"))
    floor = floor.merge(again[keys + ["latency_ms", "again_clock"]].rename(columns={"latency_ms": "again_ms"}),
                        on=keys, how="left")
    pair = floor[["baseline_ms", "again_ms"]]
    floor["drift_rel"] = (pair.max(axis=1, skipna=False) / pair.min(axis=1, skipna=False)) - 1
    floor["noise_floor"] = floor[["drift_rel", "ci_rel"]].max(axis=1, skipna=True)
    return floor


def column(frame: pd.DataFrame, name: str, default=float("nan")) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index)


def flag(frame: pd.DataFrame, name: str) -> pd.Series:
    """A boolean column that older rows may lack (or hold as missing): missing reads False."""
    return column(frame, name, False).fillna(False).astype(bool)


# Repeats scattering more than this (coefficient of variation) mean a machine under load: no speedup is claimed.
NOISY_CV = 0.10
# An SM clock this much below the baseline's at the same size withholds the speedup ("lower clocks").
CLOCK_DROP = 0.03
# Other work on the host's CPUs (CPUs busy on average, beyond the TP group's) from which a host-bound timing is
# "busy host".
BUSY_HOST_CPUS = 0.5
# The verdicts of a measurement that cannot carry a claim, in the order they are checked.
UNCLAIMED = ("too noisy", "busy host", "not settled", "lower clocks")
VERDICTS = ("faster", "slower", "within noise") + UNCLAIMED
# speedups.parquet: one row per config (not all-off), TP size and num_tokens that has a speedup
SPEEDUP_COLUMNS = ("config_id", "label", "tp", "num_tokens", "speedup", "ci_low", "ci_high", "verdict", "note")


def speedups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (config, tp, num_tokens) with ``speedup`` (NaN where not meaningful), its interval
    (``ci_low``, ``ci_high``), its ``verdict`` (one of ``VERDICTS``, or empty where there is no speedup), ``note``
    and the ``noise_floor`` it is judged against."""
    measured = table[table["status"] != "skipped"].copy()
    merged = measured.merge(noise_floor(table), on=["tp", "num_tokens"], how="left")
    merged["paired"] = column(merged, "paired_speedup")
    notes, values = [], []
    for _, row in merged.iterrows():
        enabled = enabled_fusions(row)
        active = active_fusions(row, enabled)
        unfired = [f for f in active if not row.get(f"matches_{f}", 0)]
        unfused = [f for f in active if f == "fuse_attn_quant" and SDPA_THEN_QUANT in str(row.get("attention_used"))]
        out_of_range = [f for f in enabled if f not in active]
        # Off at this size because of its threshold, or (SP, AsyncTP) because num_tokens does not split over TP.
        why_off = "off, num_tokens does not split over TP" \
            if str(row.get("compile_range", "")).endswith(f"/{INDIVISIBLE}") else "outside its range"
        if row["status"] != "ok":
            note, value = row["status"], float("nan")
        elif pd.isna(row["baseline_ms"]):
            note, value = "no baseline", float("nan")
        elif unfired:
            note, value = f"did not fire: {', '.join(unfired)}", float("nan")
        elif enabled and not active:
            note, value = f"outside the num_tokens range of {', '.join(out_of_range)}", float("nan")
            if why_off != "outside its range":
                note = f"{why_off}: {', '.join(out_of_range)}"
        elif unfused and len(unfused) == len(active):
            note, value = f"ran no fused kernel (unfused kernels are faster at this size): {', '.join(unfused)}", \
                float("nan")
        else:
            reasons = [f"{why_off}: {', '.join(out_of_range)}"] if out_of_range else []
            reasons += [f"ran no fused kernel at this size: {', '.join(unfused)}"] if unfused else []
            note = "; ".join(reasons)
            value = row["paired"] if pd.notna(row["paired"]) else row["baseline_ms"] / row["latency_ms"]
        notes.append(note)
        values.append(value)
    merged["speedup"], merged["note"] = values, notes
    _judge(merged)
    return merged


def _judge(merged: pd.DataFrame) -> None:
    """Add each speedup's interval and verdict, and the notes that go with them (see the module doc)."""
    config_low = column(merged, "latency_ms_ci_low").fillna(merged["latency_ms"])
    config_high = column(merged, "latency_ms_ci_high").fillna(merged["latency_ms"])
    base_low = merged["base_ci_low"].fillna(merged["baseline_ms"])
    base_high = merged["base_ci_high"].fillna(merged["baseline_ms"])
    drift = 1 + column(merged, "drift_rel").fillna(0.0)
    paired = merged["paired"].notna()
    merged["ci_low"] = (base_low / config_high / drift).where(~paired, column(merged, "paired_ci_low"))
    merged["ci_high"] = (base_high / config_low * drift).where(~paired, column(merged, "paired_ci_high"))
    merged.loc[merged["speedup"].isna(), ["ci_low", "ci_high"]] = float("nan")
    worst_cv = pd.concat([column(merged, "latency_ms_cv"), merged["base_cv"]], axis=1).max(axis=1, skipna=True)
    floor = merged["noise_floor"].fillna(0.0).where(~paired, 0.0)  # a paired interval holds the drift already
    again = flag(merged, "baseline_repeat")
    verdicts, notes = [], []
    for i, row in merged.iterrows():
        verdict, note = "", row["note"]
        if pd.notna(row["speedup"]) and not row["is_baseline"] and not again[i]:
            clock, base_clock = row.get("gpu_sm_clock_mhz"), row.get("baseline_clock")
            # a paired row's all-off ran in its rounds: its own interval and clocks are what count
            unsettled = [who for who, settled in (("the config", row.get("settled")),
                                                  ("all-off", None if paired[i] else row.get("base_settled")))
                         if _said_no(settled)]
            busy = max((v for v in (row.get("host_other_cpus"), row.get("base_host_other")) if pd.notna(v)),
                       default=0.0)
            host_bound = "cuda-graph" not in str(row.get("timing") or "")
            if worst_cv[i] > NOISY_CV:
                verdict, extra = "too noisy", f"too noisy to claim (CV {worst_cv[i]:.0%})"
            elif host_bound and busy >= BUSY_HOST_CPUS:
                verdict, extra = "busy host", (f"busy host ({busy:.1f} CPUs of other work while timing), not "
                                               "claimed")
            elif unsettled:
                what = "its paired interval" if paired[i] else f"{' and '.join(unsettled)}: the median's interval"
                verdict, extra = "not settled", f"not settled ({what} stayed wider than measure.settle), not claimed"
            elif (not paired[i] and pd.notna(clock) and pd.notna(base_clock)
                  and clock < base_clock * (1 - CLOCK_DROP)):
                verdict, extra = "lower clocks", (f"lower SM clock than all-off ({clock:.0f} against "
                                                  f"{base_clock:.0f} MHz), not claimed")
            elif row["ci_low"] > 1 and row["speedup"] - 1 > floor[i]:
                verdict, extra = "faster", ""
            elif row["ci_high"] < 1 and 1 - row["speedup"] > floor[i]:
                verdict, extra = "slower", ""
            else:
                inside = abs(row["speedup"] - 1) <= floor[i]
                verdict, extra = "within noise", (f"within noise (+/-{floor[i]:.1%})" if inside else
                                                  "within noise (its interval covers 1)")
            note = "; ".join(filter(None, [extra, note]))
        elif pd.notna(row["speedup"]) and again[i]:
            note = f"the A/A check: all-off again, {abs(row['speedup'] - 1):.1%} off the first"
            if paired[i]:
                covers = row["ci_low"] <= 1 <= row["ci_high"]
                note = (f"the A/A check, paired with all-off: {row['speedup']:.3f} [{row['ci_low']:.3f}-"
                        f"{row['ci_high']:.3f}], {'covers 1' if covers else 'does not cover 1: the pairing is off'}")
        verdicts.append(verdict)
        notes.append(note)
    merged["verdict"], merged["note"] = verdicts, notes


def _said_no(value) -> bool:
    """A flag that is False (not missing: older rows lack it)."""
    return value is not None and not pd.isna(value) and not bool(value)


def pooled_runs(data: pd.DataFrame) -> pd.DataFrame:
    """Configs measured in several runs (``measure.runs``), pooled per (config, tp, num_tokens): the median of the
    runs' medians, the spread between runs (largest over smallest, less 1), and the speedup of the pooled median.
    Each run compiles and builds the model afresh, so the spread between runs is the noise a user deploying the
    config meets; one run's floor sees only part of it. Empty when no config ran more than once."""
    if "run" not in data:
        return pd.DataFrame()
    ok = data[(data["status"] == "ok") & ~data["is_baseline"].astype(bool) & ~flag(data, "baseline_repeat")]
    ok = ok.assign(base_id=ok["config_id"].str.replace(r"-run\d+$", "", regex=True),
                   base_label=ok["label"].str.replace(r" \(run \d+\)$", "", regex=True))
    groups = ok.groupby(["base_id", "base_label", "tp", "num_tokens"])
    pooled = groups.agg(runs=("latency_ms", "size"), latency_ms=("latency_ms", "median"),
                        fastest=("latency_ms", "min"), slowest=("latency_ms", "max"),
                        baseline_ms=("baseline_ms", "first"), noise_floor=("noise_floor", "first"),
                        fired=("speedup", lambda v: bool(v.notna().all()))).reset_index()
    pooled = pooled[pooled["runs"] > 1]
    if pooled.empty:
        return pooled
    pooled["run_spread"] = pooled["slowest"] / pooled["fastest"] - 1
    pooled["speedup"] = (pooled["baseline_ms"] / pooled["latency_ms"]).where(pooled["fired"])
    band = pooled[["run_spread", "noise_floor"]].max(axis=1)
    pooled["beyond_noise"] = (pooled["speedup"] - 1).abs() > band
    return pooled


def enabled_fusions(row) -> list[str]:
    """The fusions the row ran with that could match in its model: one with no pattern for the model's quant
    scheme or TP size (norm + quant in a bf16 model, switched on by the level) cannot fire, so its 0 matches say
    nothing against the speedup."""
    quant = row.get("model_quant")
    return [f for f in FUSION_FLAGS if is_on(row.get(f)) and (
        not isinstance(quant, str) or PASSES_BY_FLAG[f].applicability(quant, int(row["tp"]))[0])]


def active_fusions(row, enabled: list[str]) -> list[str]:
    """The enabled fusions the row's num_tokens range compiled with (all of them in rows from before ranges)."""
    recorded = row.get("active_passes")
    if not isinstance(recorded, str):
        return enabled
    return [f for f in enabled if f in recorded.split(",")]


def is_on(value) -> bool:
    return bool(value) and not (isinstance(value, float) and pd.isna(value))
