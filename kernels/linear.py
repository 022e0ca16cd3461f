"""FP8 scaled matmul: what an FP8 linear layer runs after its activation is quantised.

``scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)``: ``a`` [M, K] FP8 codes with a per-tensor scale,
per-row scales [M, 1], or per-group scales [M, K // group_size] (``group_size > 0``); ``b`` [N, K] FP8 weight
codes with per-output-channel scales [N]. The reference dequantises to fp32 and multiplies: it is the numerics
definition, exact up to fp32 accumulation order, and what a fast GEMM is checked against. On CUDA, per-tensor and
per-token activations go through cuBLASLt's FP8 GEMM.
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


def _scaled_mm_cuda(a, a_scale, b, b_scale, group_size, out_dtype):
    """cuBLASLt FP8 GEMM through ``torch._scaled_mm`` with row-wise scales (a per-tensor activation scale is
    broadcast to rows). Per-group activation scales have no such path in torch 2.11: they take the reference."""
    if group_size > 0 or out_dtype not in (torch.bfloat16, torch.float16) or a.shape[1] % 16 or b.shape[0] % 16:
        return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
    scale_a = a_scale.float().reshape(-1, 1).expand(a.shape[0], 1).contiguous()
    scale_b = b_scale.float().reshape(1, -1)
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


scaled_mm = define_op(
    "scaled_mm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int group_size, ScalarType out_dtype) -> Tensor",
    _scaled_mm,
    _fake,
)
scaled_mm.register_kernel("cuda")(_scaled_mm_cuda)
