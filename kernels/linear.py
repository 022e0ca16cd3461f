"""FP8 scaled matmul: what an FP8 linear layer runs after its activation is quantised.

``scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)``: ``a`` [M, K] FP8 codes with a per-tensor scale,
per-row scales [M, 1], or per-group scales [M, K // group_size] (``group_size > 0``, token-major as
``numerics.token_major_scales`` lays them out); ``b`` [N, K] FP8 weight codes with per-output-channel scales [N],
or with group_size x group_size tile scales [N / group_size, K / group_size] (per-group models). The reference
dequantises to fp32 and multiplies: it is the numerics definition, exact up to fp32 accumulation order, and what a
fast GEMM is checked against. On CUDA, per-tensor and per-token activations go through cuBLASLt's FP8 GEMM, and
1x128 activation groups with 128x128 weight tiles through its block-scaled GEMM where this torch offers it.
"""

from __future__ import annotations

import warnings

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
    b_values = numerics.dequantize_weight(b, b_scale, group_size)
    return (a_values @ b_values.t()).to(out_dtype)


def _fake(a, a_scale, b, b_scale, group_size, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


_BLOCKWISE_FAILURE: list[str] = []  # set once if this torch / GPU has no block-scaled FP8 GEMM


def _scaled_mm_cuda(a, a_scale, b, b_scale, group_size, out_dtype):
    """cuBLASLt FP8 GEMM through ``torch._scaled_mm``: row-wise scales (a per-tensor activation scale is broadcast
    to rows), or 1x128 x 128x128 block scales. Shapes it cannot take run the reference, and a torch without block
    scaling says so once."""
    if out_dtype not in (torch.bfloat16, torch.float16) or a.shape[1] % 16 or b.shape[0] % 16:
        return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
    if group_size > 0:
        if group_size != 128 or b_scale.dim() != 2 or _BLOCKWISE_FAILURE:
            return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
        try:  # a_scale is token-major [M, K/128]; cuBLASLt reads the weight tiles as [K/128, N/128]
            return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)
        except (RuntimeError, NotImplementedError) as exc:
            _BLOCKWISE_FAILURE.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"no block-scaled FP8 GEMM in this torch ({_BLOCKWISE_FAILURE[0][:200]}); per-group "
                          "linears run the fp32 reference GEMM", stacklevel=2)
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
