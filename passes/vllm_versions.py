"""vLLM releases and the PassConfig fields each refuses: what an export may write for the vLLM a user runs.

vLLM's PassConfig forbids unknown fields, so a flag line that names a field its release removed stops vLLM at
start-up. fusiontune implements the reference page's PassConfig (``passes.config.PassConfig``). A release is
described here by the reference fields it no longer has, and why.

Sources: vLLM's released ``vllm/config/compilation.py`` and ``vllm/compilation/passes/fusion/*.py``, as read for
issue 21 (2026-11-28). ``enable_sp``, ``fuse_gemm_comms`` and ``sp_min_token_num`` exist through 0.31.0; 0.32.0
removed them with sequence parallelism and AsyncTP. Fields vLLM added that the reference page does not describe
(``fuse_rope_kvcache_cat_mla``, ``fuse_qk_norm_rope_kvcache``, ``fuse_mla_dual_rms_norm``) are never exported,
so they need no entry. Releases before 0.31 are not listed: when each reference field first appeared is not
recorded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEQUENCE_PARALLEL_FIELDS = frozenset({"enable_sp", "fuse_gemm_comms", "sp_min_token_num"})


@dataclass(frozen=True)
class VllmRelease:
    version: str  # major.minor
    removed: frozenset[str]  # reference PassConfig fields this release refuses
    why: str = ""


RELEASES: dict[str, VllmRelease] = {r.version: r for r in (
    VllmRelease("0.31", frozenset()),
    VllmRelease("0.32", SEQUENCE_PARALLEL_FIELDS, "vLLM 0.32 removed sequence parallelism and AsyncTP"),
    VllmRelease("0.33", SEQUENCE_PARALLEL_FIELDS, "vLLM 0.32 removed sequence parallelism and AsyncTP"),
)}


def _order(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


NEWEST = max(RELEASES, key=_order)


def newest_with(fields: list[str]) -> str:
    """The newest release that still has ``fields``."""
    return max((r.version for r in RELEASES.values() if not set(fields) & r.removed), key=_order)


def release(version: str) -> VllmRelease:
    """The release a version names ("0.33", "0.33.0" and "0.33.1" are all 0.33)."""
    key = ".".join(version.strip().lstrip("v").split(".")[:2])
    if key not in RELEASES:
        raise ValueError(f"vLLM version {version!r} is not known here; known: {', '.join(RELEASES)} "
                         f"(passes/vllm_versions.py lists each release's PassConfig)")
    return RELEASES[key]


def fit(fields: dict[str, Any], version: str) -> tuple[dict[str, Any], list[str]]:
    """The PassConfig fields as the release takes them, and the fusions it cannot run. A removed flag that is off,
    or a removed threshold of such a flag, is dropped without loss; a removed flag that is on cannot be expressed."""
    removed = release(version).removed
    blocked = [name for name, value in fields.items() if name in removed and value is True]
    return {k: v for k, v in fields.items() if k not in removed}, blocked
