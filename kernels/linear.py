"""FP8 scaled matmul: what an FP8 linear layer runs after its activation is quantised.

``scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)``: ``a`` [M, K] FP8 codes with a per-tensor scale,
per-row scales [M, 1], or per-group scales [M, K // group_size] (``group_size > 0``); ``b`` [N, K] FP8 weight
codes with per-output-channel scales [N]. The reference dequantises to fp32 and multiplies: it is the numerics
definition, exact up to fp32 accumulation order, and what a fast GEMM is checked against.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def _scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    a_values = numerics.dequantize(a, a_scale, group_size if group_size > 0 else None)
    b_values = numerics.dequantize(b, b_scale.reshape(-1, 1))
    return (a_values @ b_values.t()).to(out_dtype)


def _fake(a, a_scale, b, b_scale, group_size, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


scaled_mm = define_op(
    "scaled_mm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int group_size, ScalarType out_dtype) -> Tensor",
    _scaled_mm,
    _fake,
)
