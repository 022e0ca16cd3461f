"""Tune files: which fusions and thresholds to search, under which workload, with which study settings.

The objective of a trial is the expected step latency under the workload, relative to all fusions off:
``sum_n w(n) * latency(n) / sum_n w(n) * baseline(n)`` over the measured num_tokens ``n``, where ``w`` is the
workload's histogram (how many of the serving engine's steps run at each size). Lower is better; 0.95 means the
fused engine would spend 5% less time in forwards on that traffic.

A workload is given as a histogram over the measured sizes, or as a trace (CSV or Parquet with a ``num_tokens``
column, one row per step). A trace's step of n tokens counts toward the smallest measured size >= n, as a serving
engine pads a step up to its next captured CUDA-graph size; steps beyond the largest size count toward it.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import pandas as pd
from pydantic import Field, field_validator, model_validator

from fusiontune.passes.fusions import FUSION_FLAGS, THRESHOLDS

from .sweep import (ClusterSpec, check_pass_config_value, CollectivesSpec, MeasureSpec, ModelSpec, NumTokens, PassConfigFields, Scalar,
                    SweepError, SweepSpec, _Strict, parse_spec, read_file)


class WorkloadSpec(_Strict):
    histogram: Optional[dict[int, float]] = None  # num_tokens -> share of steps (any scale)
    trace: Optional[str] = None  # CSV or Parquet with a num_tokens column, one row per step

    @model_validator(mode="after")
    def _one_source(self):
        if (self.histogram is None) == (self.trace is None):
            raise ValueError("give the workload as exactly one of histogram: {num_tokens: weight} or trace: FILE")
        if self.histogram is not None and (not self.histogram or any(w < 0 for w in self.histogram.values())
                                           or not sum(self.histogram.values()) > 0):
            raise ValueError("histogram weights must be >= 0 and not all 0")
        return self


class SearchSpec(_Strict):
    fusions: list[str] = Field(default_factory=list)  # each tried on and off
    thresholds: dict[str, list[Union[int, float]]] = Field(default_factory=dict)  # each: a list of choices

    @field_validator("fusions")
    @classmethod
    def _known_fusions(cls, values):
        unknown = [v for v in values if v not in FUSION_FLAGS]
        if unknown:
            raise ValueError(f"unknown fusion {', '.join(unknown)}; allowed: {', '.join(FUSION_FLAGS)}")
        return list(dict.fromkeys(values))

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, values):
        for name, choices in values.items():
            if name not in THRESHOLDS:
                raise ValueError(f"unknown threshold {name!r}; allowed: {', '.join(THRESHOLDS)}")
            if not choices:
                raise ValueError(f"{name}: give at least one value to try")
            for choice in choices:
                check_pass_config_value(name, choice)
        return values


class StudySpec(_Strict):
    trials: int = Field(20, ge=1)
    seed: int = 0
    storage: Optional[str] = None  # an Optuna storage URL; default: sqlite:///<run folder>/study.db
    study_name: Optional[str] = None  # default: the tune file's name
    prune: bool = True  # stop a trial after its first num_tokens when it is worse than the median trial there
    startup_trials: int = Field(4, ge=1)  # random suggestions before TPE models the results
    confirm: int = Field(3, ge=0)  # the best configs measured again at the end, in one run, to pick among
    start_all_on: bool = True  # the first trial: every searched fusion on, thresholds at their defaults
    max_evaluations: Optional[int] = Field(None, ge=1)  # measure at most this many configs (trials that reuse a
    # measured config's value, or are pruned at a config pruned before, cost nothing and do not count)


class TuneSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    tp: int = Field(1, ge=1)
    num_tokens: NumTokens
    optimization_level: int = Field(2, ge=0, le=3)
    workload: WorkloadSpec
    search: SearchSpec
    # fields held fixed in every trial
    pass_config: Annotated[dict[str, Scalar], PassConfigFields] = Field(default_factory=dict)
    # unpaired unless asked: a trial is one config, so pairing it would time all-off beside every trial (about
    # twice the forwards), where a sweep's batch shares one all-off among its configs
    measure: MeasureSpec = Field(default_factory=dict, validate_default=True)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    collectives: CollectivesSpec = Field(default_factory=CollectivesSpec)
    study: StudySpec = Field(default_factory=StudySpec)

    @field_validator("measure", mode="before")
    @classmethod
    def _unpaired_unless_asked(cls, value):
        return {"paired": False, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self):
        both = set(self.pass_config) & (set(self.search.fusions) | set(self.search.thresholds))
        if both:
            raise ValueError(f"{', '.join(sorted(both))}: both fixed in pass_config and searched; keep one")
        if not self.search.fusions and not self.search.thresholds:
            raise ValueError("search: name at least one fusion or threshold to tune")
        if self.workload.histogram is not None:
            outside = sorted(set(self.workload.histogram) - set(self.num_tokens))
            if outside:
                raise ValueError(f"workload.histogram: num_tokens {outside} are not measured; add them to "
                                 f"num_tokens {self.num_tokens} or use a trace, which is binned to them")
        return self

    def as_sweep(self) -> SweepSpec:
        """The sweep this tune measures in: same model, TP size, sizes, measurement and cluster."""
        return SweepSpec(name=self.name, model=self.model, tp=self.tp, num_tokens=self.num_tokens,
                         optimization_level=self.optimization_level, pass_config=dict(self.pass_config),
                         measure=self.measure, cluster=self.cluster, collectives=self.collectives)


def load_tune(path: str | Path) -> tuple[TuneSpec, str]:
    """Parse and validate a tune file; returns the spec and the file's text (kept in the manifest)."""
    text = read_file(path, "tune")
    keys = "name:, model:, num_tokens:, workload:, search:, ..."
    return parse_spec(text, str(path), TuneSpec, "tune", keys), text


def workload_weights(spec: TuneSpec, base_dir: Path = Path(".")) -> dict[int, float]:
    """The workload as weights over the measured sizes, summing to 1."""
    if spec.workload.histogram is not None:
        counts = {n: float(spec.workload.histogram.get(n, 0.0)) for n in spec.num_tokens}
    else:
        counts = bin_trace(read_trace(base_dir / spec.workload.trace), spec.num_tokens)
    total = sum(counts.values())
    if not total > 0:
        raise SweepError("workload: no step falls on the measured num_tokens")
    return {n: w / total for n, w in counts.items()}


def read_trace(path: Path) -> pd.Series:
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise SweepError(f"workload.trace: cannot read {path}: {exc}") from None
    if "num_tokens" not in frame:
        raise SweepError(f"workload.trace: {path} has no num_tokens column (columns: {', '.join(frame.columns)})")
    return frame["num_tokens"]


def bin_trace(steps: pd.Series, sizes: list[int]) -> dict[int, float]:
    """Each step counts toward the smallest measured size that holds it (the largest for longer steps)."""
    counts = {n: 0.0 for n in sizes}
    for tokens, count in steps.value_counts().items():
        index = min(bisect.bisect_left(sizes, int(tokens)), len(sizes) - 1)
        counts[sizes[index]] += float(count)
    return counts


def expected_ratio(latency_ms: dict[int, float], baseline_ms: dict[int, float], weights: dict[int, float]) -> float:
    """sum_n w(n) latency(n) / sum_n w(n) baseline(n) over the sizes with weight; inf if one is missing."""
    used = [n for n, w in weights.items() if w > 0]
    if any(not math.isfinite(latency_ms.get(n, math.nan)) for n in used):
        return math.inf
    return sum(weights[n] * latency_ms[n] for n in used) / sum(weights[n] * baseline_ms[n] for n in used)


def first_size(weights: dict[int, float], baseline_ms: dict[int, float]) -> int:
    """The size that weighs most in the objective: measured first, and where hopeless trials are pruned."""
    return max(weights, key=lambda n: weights[n] * baseline_ms.get(n, 0.0))


def trial_fields(spec: TuneSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's user-set PassConfig fields: the fixed ones, the searched enables, and the thresholds."""
    return {**spec.pass_config, **params}
