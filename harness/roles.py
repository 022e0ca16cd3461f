"""What a config is for in a run, as one value: it was three booleans (``is_baseline``, ``baseline_repeat``,
``reference_only``) that could contradict each other. Rows keep the two columns ``is_baseline`` and
``baseline_repeat``, read off the role."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    BASELINE = "baseline"  # all-off, first at its TP size: every speedup's denominator, every output's reference
    BASELINE_AGAIN = "baseline again"  # all-off again, last: the noise floor (the A/A check)
    CONFIG = "config"  # measured against the baseline
    REFERENCE = "reference"  # a resumed run's baseline: its outputs are needed, its rows exist; nothing is timed

    @property
    def is_baseline(self) -> bool:
        """Its outputs are what every other config of its TP size is checked against."""
        return self in (Role.BASELINE, Role.REFERENCE)
