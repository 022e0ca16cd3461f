"""What a TP group is asked to do (``Job``: one config over the sweep's num_tokens) and what each of its ranks
answers per size (``RankResult``). The launcher makes jobs and merges results into rows (``rows``); the worker
runs them; Ray carries both between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusiontune.passes.platform import Platform

from .roles import Role
from .timing import Repeats


@dataclass
class Job:
    """One config of a sweep, at one TP size, over all of the sweep's num_tokens."""

    config_id: str
    pass_config: dict[str, Any]  # user-set fields only
    optimization_level: int
    model: dict[str, Any]  # ModelConfig fields
    num_tokens: list[int]
    warmup: int = 3
    repeats: int = 20  # at least this many, then more until the median settles (up to max_repeats)
    seed: int = 0
    role: Role = Role.CONFIG  # BASELINE / REFERENCE: its outputs are kept to check the others against
    max_repeats: int | None = None  # None: exactly ``repeats``
    settle: float = 0.005  # stop when the median's 95% CI half-width is within this fraction of it
    profile: bool = False  # a torch.profiler trace and per-kernel times per num_tokens
    compile_cache: bool = True  # reuse graphs Inductor compiled in earlier runs
    collectives: dict[str, str] = field(default_factory=dict)  # symm_mem.CollectiveSettings fields
    # the platform the plan resolved PassConfig on (None: this rank's own, for jobs made by hand)
    platform: Platform | None = None
    # all-off's PassConfig (user-set fields), to time this config against in alternating rounds (measure.paired)
    paired_with: dict[str, Any] | None = None

    @property
    def is_baseline(self) -> bool:
        return self.role.is_baseline

    @property
    def reference_only(self) -> bool:  # the all-off outputs for later comparisons; nothing timed (a resumed run)
        return self.role is Role.REFERENCE

    @property
    def repeat_rule(self) -> Repeats:
        return Repeats(self.repeats, max(self.repeats, self.max_repeats or self.repeats), self.settle)


@dataclass
class RankResult:
    """What one rank measured for one num_tokens (the launcher merges ranks into a row)."""

    num_tokens: int
    times_ms: list[float] = field(default_factory=list)
    matches: dict[str, int] = field(default_factory=dict)
    max_abs_err: float = float("nan")
    tolerance: float = float("nan")
    error: str = ""
    resolved: dict[str, Any] = field(default_factory=dict)
    compile_s: float = 0.0
    compile_range: str = ""  # the num_tokens range whose compiled graph ran this size ("1-128", ">=2048")
    active: list[str] = field(default_factory=list)  # the passes that range compiled with
    timing: str = ""  # how the times were taken ("cuda-graph (...)", "eager events (...)", "wall clock")
    gpu: dict[str, float] = field(default_factory=dict)  # timing.gpu_state right after the timed repeats
    host_other_cpus: float = float("nan")  # CPUs busy beyond the TP group's during the timed repeats (host_load)
    allreduce_used: str = ""  # the collective implementations that ran at this size (symm_mem.take_used)
    attention_used: str = ""  # the attention implementations that ran at this size (implementations.ATTENTION)
    gemm_used: str = ""  # the FP8 GEMM implementations that ran at this size (implementations.GEMM)
    kernels: list[dict] = field(default_factory=list)  # profile.kernel_times of this size
    trace: bytes = b""  # its gzipped Chrome trace (rank 0 only)
    paired_base_ms: list[float] = field(default_factory=list)  # all-off's times, round by round beside times_ms
