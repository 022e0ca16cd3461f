"""Which implementation each op ran, since the worker last asked: rows record it, so that a speedup says what it
was measured against (issue 22: the unfused ops must be the fastest a serving engine would run). Ops record under
a kind: ``COLLECTIVE`` (the all-reduce and AsyncTP ops: NCCL, symmetric memory, our fused kernel, FlashInfer's;
``symm_mem.record``), ``ATTENTION`` (cuDNN's through SDPA, or our Triton kernel) and ``GEMM`` (the FP8 linear
layers: cuBLASLt's row-wise or block-scaled GEMM, or the fp32 reference where cuBLASLt cannot take the shape, which
would make a slow baseline)."""

from __future__ import annotations

COLLECTIVE = "collective"
ATTENTION = "attention"
GEMM = "gemm"
_USED: dict[str, set[str]] = {}


def record(kind: str, implementation: str) -> None:
    _USED.setdefault(kind, set()).add(implementation)


def used(kind: str) -> set[str]:
    """The implementations of ``kind`` run since it was last taken, kept."""
    return set(_USED.get(kind, ()))


def take(kind: str) -> str:
    """The implementations of ``kind`` run since the last call (comma-separated), and forget them."""
    return ",".join(sorted(_USED.pop(kind, ())))


def forget() -> None:
    _USED.clear()
