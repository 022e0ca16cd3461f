"""num_tokens ranges: a pass marked "low" or "high" applies only on its side of its threshold, so the model is
compiled once per range, with that range's passes, and a forward dispatches on num_tokens (as vLLM's compile
ranges do).

The split points come from the enabled passes' thresholds (``PassSpec.token_bound``): a low pass bounded at b
(largest num_tokens it takes) splits after b, a high pass bounded at b (smallest) splits before b. A low pass
without a threshold of its own (Q/K-norm + RoPE) applies in the lowest range.

Where sequence parallelism and the all-reduce fusion both apply, SP runs first and takes every all-reduce (vLLM's
order), so the range compiles without the all-reduce fusion. Sizes of that range that do not split over the TP
group run without SP, and with the all-reduce fusion back (``CompileRange.unsplit``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import ResolvedPassConfig
from .fusions import PASSES_BY_FLAG, PassSpec

INDIVISIBLE = "indivisible"  # the variant of a range for sizes that do not split over TP (SP, AsyncTP off)
SUPERSEDES = {"enable_sp": ("fuse_allreduce_rms",)}  # a pass that takes every match of these where both apply


@dataclass(frozen=True)
class CompileRange:
    low: int  # smallest num_tokens, inclusive
    high: int | None  # largest num_tokens, inclusive; None: no limit
    config: ResolvedPassConfig  # the passes outside this range switched off
    variant: str = ""  # set where sizes of the range run another graph ("indivisible": SP off)
    # The range's passes before any superseding: sizes that do not split over TP start from these, less SP
    in_range: ResolvedPassConfig | None = None

    def __contains__(self, num_tokens: int) -> bool:
        return num_tokens >= self.low and (self.high is None or num_tokens <= self.high)

    @property
    def label(self) -> str:
        bounds = f"{self.low}-{self.high}" if self.high is not None else f">={self.low}"
        return f"{bounds}/{self.variant}" if self.variant else bounds

    @property
    def active(self) -> tuple[str, ...]:
        return self.config.enabled_passes


def _applies(spec: PassSpec, bound: int | None, low: int, high: int | None, lowest: bool) -> bool:
    if spec.token_range == "always":
        return True
    if spec.token_range == "low":
        return lowest if bound is None else high is not None and high <= bound
    return bound is not None and low >= bound


def compile_ranges(config: ResolvedPassConfig) -> list[CompileRange]:
    """The ranges this config compiles for, lowest first; one range (1 and up) when no enabled pass splits."""
    bounds = {flag: PASSES_BY_FLAG[flag].token_bound(config.values, config.platform)
              for flag in config.enabled_passes}
    starts = {1}
    for flag, bound in bounds.items():
        if bound is not None:
            starts.add(bound + 1 if PASSES_BY_FLAG[flag].token_range == "low" else bound)
    starts = sorted(s for s in starts if s >= 1)
    ranges = []
    for i, low in enumerate(starts):
        high = starts[i + 1] - 1 if i + 1 < len(starts) else None
        outside = {flag for flag, bound in bounds.items()
                   if not _applies(PASSES_BY_FLAG[flag], bound, low, high, lowest=i == 0)}
        part = CompileRange(low, high, config)
        in_range = config.switched_off(outside, f"outside its num_tokens range ({part.label})")
        ranges.append(replace(part, config=_superseded_off(in_range), in_range=in_range))
    return ranges


def _superseded_off(config: ResolvedPassConfig) -> ResolvedPassConfig:
    for flag, taken in SUPERSEDES.items():
        if config.values[flag]:
            on = [f for f in taken if config.values[f]]
            config = config.switched_off(on, f"{flag} takes its matches in this range (it runs first, as in vLLM)")
    return config


def range_for(ranges: list[CompileRange], num_tokens: int, tp_size: int = 1) -> CompileRange:
    """The range whose graph runs ``num_tokens``. A size that does not split over the TP group runs the range's
    passes less those that shard tokens (SP, AsyncTP), with what SP superseded back on: its own graph, labelled
    "<range>/indivisible"."""
    part = next(r for r in ranges if num_tokens in r)
    whole = part.in_range or part.config
    splitting = [flag for flag in whole.enabled_passes if PASSES_BY_FLAG[flag].splits_tokens]
    if tp_size == 1 or num_tokens % tp_size == 0 or not splitting:
        return part
    why = f"num_tokens={num_tokens} does not split over TP={tp_size}"
    return replace(part, config=whole.switched_off(splitting, why), variant=INDIVISIBLE)
