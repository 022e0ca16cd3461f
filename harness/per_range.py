"""Per-range enables: which fusions to run at each num_tokens, read off the configs a tune run measured.

Each num_tokens range is compiled with its own passes, so the latency at a size depends only on the passes active
there (the rows' ``active_passes``). Taking the fastest measured config at each size separately therefore gives a
plan whose expected latency is a weighted sum of measured numbers, with no further run. A size leaves the best
single config only where a config with other passes active there beats it by more than that size's noise floor:
no plan is built on noise.

vLLM has no per-range enable. A fusion marked low or high follows its threshold; any other applies at every size.
The plan becomes PassConfig fields where it can: a low fusion on up to some size gets its threshold there (the
largest measured size it is on at: nothing is assumed about sizes between measured ones), a high fusion on from
some size its ``sp_min_token_num``. A fusion that vLLM applies everywhere but that pays only at some sizes cannot
be expressed; the plan says so and keeps the best single config's choice for it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS, PASSES_BY_FLAG

from .analysis import flag as flag_column
from .analysis import is_on, noise_floor
from .model import DTYPES
from .tune_spec import expected_ratio


def _measured(table: pd.DataFrame, tp: int) -> pd.DataFrame:
    ok = table[(table["status"] == "ok") & (table["tp"] == tp)]
    return ok[~flag_column(ok, "baseline_repeat")]


def best_single(table: pd.DataFrame, weights: dict[int, float], tp: int) -> tuple[str, float] | None:
    """The config with the lowest expected latency among those measured at every weighted size."""
    ok = _measured(table, tp)
    baseline = ok[ok["is_baseline"].astype(bool)].set_index("num_tokens")["latency_ms"].to_dict()
    best = None
    for config_id, rows in ok.groupby("config_id"):
        ratio = expected_ratio(rows.set_index("num_tokens")["latency_ms"].to_dict(), baseline, weights)
        if best is None or ratio < best[1]:
            best = (str(config_id), ratio)
    return best if best and best[1] != float("inf") else None


def range_plan(table: pd.DataFrame, weights: dict[int, float], floors: dict[int, float], tp: int,
               single_id: str | None = None) -> dict[str, Any] | None:
    """The per-size plan against the best single config (``single_id``, default: found here); None when no
    config was measured at every weighted size."""
    ok = _measured(table, tp)
    if single_id is None:
        found = best_single(table, weights, tp)
        if found is None:
            return None
        single_id = found[0]
    single = ok[ok["config_id"] == single_id].set_index("num_tokens")
    baseline = ok[ok["is_baseline"].astype(bool)].set_index("num_tokens")["latency_ms"].to_dict()
    sizes = sorted(n for n, w in weights.items() if w > 0)
    if any(n not in single.index or n not in baseline for n in sizes):
        return None
    chosen = {}
    for n in sizes:
        keep = single.loc[n]
        floor = floors.get(n)
        floor = 0.0 if floor is None or pd.isna(floor) else float(floor)
        # only configs with other passes at this size compete: one with the same passes (a low fusion outside its
        # range) compiles the same graph, and whatever it gains there is noise between runs of one graph
        at_n = ok[ok["num_tokens"] == n]
        others = at_n[[_fusions(row) != _fusions(keep) for _, row in at_n.iterrows()]]
        fastest = others.loc[others["latency_ms"].idxmin()] if len(others) else keep
        departs = bool(fastest["latency_ms"] * (1 + floor) < keep["latency_ms"])
        chosen[n] = (fastest if departs else keep, departs, floor)
    plan_ms = {n: float(row["latency_ms"]) for n, (row, _, _) in chosen.items()}
    single_ms = {n: float(single.at[n, "latency_ms"]) for n in sizes}
    plan_ratio = expected_ratio(plan_ms, baseline, weights)
    single_ratio = expected_ratio(single_ms, baseline, weights)
    active = {n: _fusions(row) for n, (row, _, _) in chosen.items()}
    fields, notes = _as_pass_config(active, sizes, single.loc[sizes[0]])
    return {
        "single": {"config_id": single_id, "label": str(single.loc[sizes[0], "label"]), "expected_ratio": single_ratio},
        "expected_ratio": plan_ratio,
        "gain_over_single": single_ratio / plan_ratio - 1,
        "departs": any(d for _, d, _ in chosen.values()),
        "expressible": not notes["inexpressible"],
        "pass_config": fields,
        "notes": list(dict.fromkeys(notes["inexpressible"] + notes["thresholds"])),
        "sizes": [{"num_tokens": int(n), "weight": float(weights[n]), "config_id": str(row["config_id"]),
                   "label": str(row["label"]), "latency_ms": float(row["latency_ms"]),
                   "speedup": float(baseline[n] / row["latency_ms"]), "departs": departs, "noise_floor": floor,
                   "fusions": sorted(active[n])}
                  for n, (row, departs, floor) in chosen.items()],
    }


def for_tune_run(table: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The plan of a tune run against its pick, from its rows: the report and export compute it again, so a run
    is read by the current rules. Only the last run's rows count (those since its baseline, the table's latest):
    a resumed study spans runs, and runs disagree beyond one run's floor."""
    best = summary.get("best")
    if not best or table.empty:
        return None
    tp = int(table["tp"].iloc[0])
    ok = table[table["status"] == "ok"]
    baseline = ok[ok["is_baseline"].astype(bool) & (ok["tp"] == tp)]
    if "measured_at" in table and len(baseline):
        table = table[table["measured_at"].astype(str) >= baseline["measured_at"].astype(str).min()]
    floors = noise_floor(table)
    floors = floors[floors["tp"] == tp].set_index("num_tokens")["noise_floor"].to_dict()
    weights = {int(n): float(w) for n, w in summary["weights"].items()}
    return range_plan(table, weights, floors, tp, best["config_id"])


def _fusions(row: pd.Series) -> set[str]:
    return set(str(row.get("active_passes") or "").split(",")) & set(FUSION_FLAGS)


def _as_pass_config(active: dict[int, set[str]], sizes: list[int],
                    single: pd.Series) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """PassConfig fields that run, at every measured size, the plan's fusions; and what cannot be expressed."""
    fields: dict[str, Any] = {}
    notes: dict[str, list[str]] = {"inexpressible": [], "thresholds": []}
    for flag in FUSION_FLAGS:
        spec = PASSES_BY_FLAG[flag]
        on = [n for n in sizes if flag in active[n]]
        if not on:
            fields[flag] = False
            continue
        prefix, suffix = on == sizes[:len(on)], on == sizes[len(sizes) - len(on):]
        if spec.token_range == "always" or not spec.thresholds:
            if on == sizes or (spec.token_range == "low" and prefix):
                fields[flag] = True
                if on != sizes:
                    notes["thresholds"].append(f"{flag} applies in the lowest compiled range only (no threshold of "
                                               f"its own): the plan has it up to {on[-1]} tokens")
                continue
            fields[flag] = is_on(single.get(flag))
            notes["inexpressible"].append(
                f"{flag} pays at num_tokens {', '.join(map(str, on))} only, and vLLM applies it at every size: "
                f"kept {'on' if fields[flag] else 'off'} as in the best single config")
            continue
        threshold = spec.thresholds[0]
        if (spec.token_range == "low" and not prefix) or (spec.token_range == "high" and not suffix):
            fields[flag] = is_on(single.get(flag))
            notes["inexpressible"].append(f"{flag} pays at num_tokens {', '.join(map(str, on))}, not one "
                                          f"{spec.token_range} range: kept as in the best single config")
            continue
        bound = on[-1] if spec.token_range == "low" else on[0]
        value = threshold.from_tokens(bound, int(single["model_hidden_size"]),
                                      DTYPES[str(single["model_dtype"])].itemsize)
        if fields.get(threshold.name, value) != value:  # SP and AsyncTP share sp_min_token_num
            fields[flag] = is_on(single.get(flag))
            notes["inexpressible"].append(f"{flag} pays from {bound} tokens, but {threshold.name} is already "
                                          f"{fields[threshold.name]:g} for another fusion: kept as in the best "
                                          "single config")
            continue
        fields[flag], fields[threshold.name] = True, value
        notes["thresholds"].append(f"{threshold.name} = {fields[threshold.name]:g}: the "
                                   f"{'largest' if spec.token_range == 'low' else 'smallest'} measured num_tokens "
                                   f"where {flag} pays")
    return fields, notes
