"""The result row: one per (config, TP, num_tokens), built here and nowhere else, typed and versioned.

A sweep's rows are its durable record (``rows.jsonl``, then ``results.parquet``), read back by the analysis,
reports, ``compare``, ``export`` and notebooks, maybe years later. So every row names the schema it follows
(``schema_version``; rows written before it existed read as version 1), and ``Row`` types the columns every row
has, checked as each row is made: a wrong type is a bug here, found before it reaches a file. The columns that
follow the sweep (each PassConfig field, ``model_*``, ``matches_<flag>``, ``collectives``' keys and the GPU's
clock, temperature and power) come on top, named by what they hold.

Version 6 (2026-12-06): ``gemm_used``, the FP8 GEMM implementations a size ran (cuBLASLt's row-wise or
block-scaled GEMM, or the fp32 reference where cuBLASLt cannot take the shape). Version 5 (2026-11-29):
``attention_used``, the attention implementations a size ran (cuDNN's through SDPA or our Triton kernel: the
unfused one is the faster for the size). Version 4 (2026-11-28): ``host_other_cpus``, the
host's CPUs busy with other work while a size was timed (``host_load``). Version 3: ``paired_*``, a config timed
in rounds with all-off (``measure.paired``). Version 2: ``schema_version`` itself. Version 1: everything before.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, create_model

from fusiontune.passes.fusions import PASSES, THRESHOLDS

from .jobs import RankResult
from .timing import combine_ranks, interval_settled, paired_speedup, round_ratios, summarize

if TYPE_CHECKING:  # the plan; imported where used, so that reading rows needs no planner
    from .sweep import Plan, PlannedConfig

SCHEMA_VERSION = 6
STATUSES = ("ok", "failed", "incorrect", "skipped")
PASS_COLUMNS = [spec.flag for spec in PASSES] + list(THRESHOLDS)
MATCH_COLUMNS = [f"matches_{spec.flag}" for spec in PASSES]
# Columns every analysis reads; a run whose configs were all skipped or failed lacks the measured ones.
MEASURED_COLUMNS = ("latency_ms", "latency_ms_p10", "latency_ms_p90", "latency_ms_ci_low", "latency_ms_ci_high",
                    "latency_ms_cv", "repeats", "max_abs_err")
# What makes a row one of ours: a file without these is not a fusiontune run.
KEY_COLUMNS = ("config_id", "label", "tp", "num_tokens", "status")
# One row per key: a resumed run measures some again, and the last measurement wins.
ROW_KEY = ["config_id", "label", "tp", "num_tokens"]


class _FixedColumns(BaseModel):
    """The columns every row has (a skipped config's row: no measured ones), and their types."""

    model_config = ConfigDict(extra="allow")  # the sweep's own columns; numpy scalars pass as Python's

    schema_version: int
    sweep: str
    config_id: str
    label: str
    is_baseline: bool
    baseline_repeat: bool
    run: int
    tp: int
    optimization_level: int
    num_tokens: int
    status: Literal[STATUSES]  # type: ignore[valid-type]
    error: str
    measured_at: str
    latency_ms: Optional[float] = None
    latency_ms_p10: Optional[float] = None
    latency_ms_p90: Optional[float] = None
    latency_ms_cv: Optional[float] = None
    latency_ms_ci_low: Optional[float] = None
    latency_ms_ci_high: Optional[float] = None
    repeats: Optional[int] = None
    settled: Optional[bool] = None
    max_abs_err: Optional[float] = None
    tolerance: Optional[float] = None
    compile_s: Optional[float] = None
    device: Optional[str] = None
    compile_range: Optional[str] = None
    active_passes: Optional[str] = None
    timing: Optional[str] = None
    host_other_cpus: Optional[float] = None
    allreduce_used: Optional[str] = None
    attention_used: Optional[str] = None
    gemm_used: Optional[str] = None
    # measure.paired: all-off's median / the config's, per round, its median over rounds and 95% interval, the
    # rounds, and all-off's median latency beside the config's
    paired_speedup: Optional[float] = None
    paired_ci_low: Optional[float] = None
    paired_ci_high: Optional[float] = None
    paired_rounds: Optional[int] = None
    paired_baseline_ms: Optional[float] = None


# ... and every pass's match count.
Row = create_model("Row", __base__=_FixedColumns, **{column: (int, ...) for column in MATCH_COLUMNS})


def checked(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as made, once ``Row`` accepts it (pydantic's ValidationError names the column otherwise)."""
    Row.model_validate(row)
    return row


def rows_for(plan: Plan, config: PlannedConfig, per_rank: list[list[RankResult]] | None,
             error: str = "", device: str = "", sizes: list[int] | None = None) -> list[dict[str, Any]]:
    """Merge the ranks' results for one config into one row per num_tokens (the sizes its job measured, or without
    results ``sizes``: the sizes its job was to measure, every size of the sweep unless said)."""
    rows = []
    sizes = [r.num_tokens for r in per_rank[0]] if per_rank else list(sizes or plan.spec.num_tokens)
    for i, num_tokens in enumerate(sizes):
        ranks = [results[i] for results in per_rank] if per_rank else []
        first = ranks[0] if ranks else RankResult(num_tokens, error=error or "no result")
        row = base_row(plan, config, first.resolved or config.resolved)
        times = combine_ranks([r.times_ms for r in ranks]) if ranks and all(r.times_ms for r in ranks) else []
        errors = [r.error for r in ranks if r.error] or ([error] if error else [])
        max_err = max((r.max_abs_err for r in ranks), default=float("nan"))
        status = "ok"
        if errors and not times:
            status = "failed"
        elif max_err > first.tolerance:
            status = "incorrect"
        row.update(summarize(times, plan.spec.measure.settle))
        row.update({
            "num_tokens": num_tokens,
            "max_abs_err": max_err,
            "tolerance": first.tolerance,
            "compile_s": max((r.compile_s for r in ranks), default=0.0),
            "status": status,
            "error": "\n".join(errors)[:4000],
            "device": device,
            "compile_range": first.compile_range,
            "active_passes": ",".join(first.active),
            "timing": first.timing,
            "allreduce_used": first.allreduce_used,
            "attention_used": first.attention_used,
            "gemm_used": first.gemm_used,
            "host_other_cpus": max((r.host_other_cpus for r in ranks if not math.isnan(r.host_other_cpus)),
                                   default=None),  # the busiest host that could say
            **{column: (min if "clock" in column or "limit" in column else max)(r.gpu.get(column, float("nan"))
                                                                               for r in ranks)
               for column in first.gpu},  # the slowest clock, lowest cap, the hottest and hungriest GPU
        })
        row.update({f"matches_{spec.flag}": first.matches.get(spec.flag, 0) for spec in PASSES})
        if times and all(r.paired_base_ms for r in ranks):
            row.update(paired_columns(times, combine_ranks([r.paired_base_ms for r in ranks]),
                                      plan.spec.measure.settle))
        rows.append(checked(row))
    return rows


def paired_columns(times_ms: list[float], base_ms: list[float], settle: float) -> dict[str, Any]:
    """A paired row's speedup over the all-off it alternated with, its interval and rounds; it settled when that
    interval did (the rule its rounds stopped by), not its latency's own."""
    speedup, low, high = paired_speedup(times_ms, base_ms)
    return {"paired_speedup": speedup, "paired_ci_low": low, "paired_ci_high": high,
            "paired_rounds": len(round_ratios(times_ms, base_ms)),
            "paired_baseline_ms": statistics.median(base_ms), "settled": interval_settled(speedup, low, high, settle)}


def base_row(plan: Plan, config: PlannedConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    model = plan.model.to_dict()
    return {
        "schema_version": SCHEMA_VERSION,
        "sweep": plan.spec.name,
        "config_id": config.config_id,
        "label": config.label,
        "is_baseline": config.is_baseline,
        "baseline_repeat": config.baseline_repeat,
        "run": config.run,
        "tp": config.tp,
        "optimization_level": plan.spec.optimization_level,
        **plan.spec.collectives.model_dump(),
        **{f"model_{k}": v for k, v in model.items()},
        **resolved,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def kernel_rows(config: PlannedConfig, per_rank: list[list[RankResult]]) -> list[dict[str, Any]]:
    stamp = time.time()
    return [{"config_id": config.config_id, "label": config.label, "tp": config.tp, "num_tokens": result.num_tokens,
             "rank": rank, "measured_at": stamp, **kernel}
            for rank, results in enumerate(per_rank) for result in results for kernel in result.kernels]


def skipped_rows(plan: Plan) -> list[dict[str, Any]]:
    from .sweep import PlannedConfig

    rows = []
    for item in plan.skipped:
        for num_tokens in plan.spec.num_tokens:
            config = PlannedConfig("", item.label, item.tp, item.pass_config, {})
            row = base_row(plan, config, item.pass_config)
            row.update({"num_tokens": num_tokens, "status": "skipped", "error": item.reason,
                        **{f"matches_{spec.flag}": 0 for spec in PASSES}})
            rows.append(checked(row))
    return rows


