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

from . import implementations, numerics
from .library import define_op

# What implementations.GEMM records for each way
CUBLASLT_ROWWISE = "cublaslt fp8 (row-wise scales)"
CUBLASLT_BLOCKWISE = "cublaslt fp8 (1x128 x 128x128 block scales)"
REFERENCE_GEMM = "fp32 reference (dequantise, then matmul)"


def _scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    implementations.record(implementations.GEMM, REFERENCE_GEMM)
    a_values = numerics.dequantize(a, a_scale, group_size if group_size > 0 else None)
    b_values = numerics.dequantize_weight(b, b_scale, group_size)
    return (a_values @ b_values.t()).to(out_dtype)


def _fake(a, a_scale, b, b_scale, group_size, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# (K, N) weight shapes whose block-scaled GEMM cuBLASLt refused, with why: those run the reference, said once.
_BLOCKWISE_REFUSED: dict[tuple[int, int], str] = {}
BLOCKWISE_ROW_MULTIPLE = 4  # cuBLASLt's block-scaled GEMM takes M = 4, 8, 12, ... only (H100, torch 2.11)
MIN_BLOCKWISE_K = 512


def _pad_rows(a: torch.Tensor, a_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and their token-major scales padded to a row count cuBLASLt's block scaling accepts
    (M = 1, 2, 3, 17, ... are refused with CUBLAS_STATUS_NOT_SUPPORTED). Padded rows are zeros with scale 1."""
    m = a.shape[0]
    padded = numerics.round_up(m, BLOCKWISE_ROW_MULTIPLE)
    if padded == m:
        return a, a_scale
    a_padded = a.new_empty((padded, a.shape[1]))
    a_padded[:m] = a
    a_padded[m:].view(torch.uint8).zero_()
    scale_padded = a_scale.new_ones((a_scale.shape[1], padded)).t()  # token-major, like numerics' layout
    scale_padded[:m] = a_scale
    return a_padded, scale_padded


def rowwise_scales(a_scale: torch.Tensor, rows: int, b_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuBLASLt's row-wise FP8 scales for ``torch._scaled_mm``: one per activation row (a per-tensor scale
    broadcast to them), one per weight row."""
    return a_scale.float().reshape(-1, 1).expand(rows, 1).contiguous(), b_scale.float().reshape(1, -1)


def _scaled_mm_cuda(a, a_scale, b, b_scale, group_size, out_dtype):
    """cuBLASLt FP8 GEMM through ``torch._scaled_mm``: row-wise scales (a per-tensor activation scale is broadcast
    to rows), or 1x128 x 128x128 block scales (rows padded to a multiple of 4, which it needs; weights of whole
    tiles, K >= 512). Shapes it cannot take run the reference, and a refusal is said once per weight shape."""
    if out_dtype not in (torch.bfloat16, torch.float16) or a.shape[1] % 16 or b.shape[0] % 16:
        return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
    if group_size > 0:
        shape = (b.shape[1], b.shape[0])
        # Whole 128 x 128 weight tiles and K >= 512 only: with a partial tile (N = 208) or K = 256, cuBLASLt
        # returned wrong values instead of refusing (H100, torch 2.11; K = 512 ... 4096 and N = 256 ... 6144 were
        # within 0.4% of the fp32 reference; tests/test_kernels.py checks both sides).
        whole_tiles = shape[0] % 128 == 0 and shape[1] % 128 == 0 and shape[0] >= MIN_BLOCKWISE_K
        if group_size != 128 or b_scale.dim() != 2 or not whole_tiles or shape in _BLOCKWISE_REFUSED:
            return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
        padded_a, padded_scale = _pad_rows(a, a_scale)
        try:  # a_scale is token-major [M, K/128]; cuBLASLt reads the weight tiles as [K/128, N/128]
            out = torch._scaled_mm(padded_a, b.t(), scale_a=padded_scale, scale_b=b_scale.t(), out_dtype=out_dtype)
            implementations.record(implementations.GEMM, CUBLASLT_BLOCKWISE)
            return out[: a.shape[0]]
        except (RuntimeError, NotImplementedError) as exc:
            _BLOCKWISE_REFUSED[shape] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"cuBLASLt refused the block-scaled FP8 GEMM for K={shape[0]}, N={shape[1]} "
                          f"({_BLOCKWISE_REFUSED[shape][:200]}); it runs the fp32 reference GEMM", stacklevel=2)
            return _scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype)
    scale_a, scale_b = rowwise_scales(a_scale, a.shape[0], b_scale)
    implementations.record(implementations.GEMM, CUBLASLT_ROWWISE)
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


scaled_mm = define_op(
    "scaled_mm",
    "(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int group_size, ScalarType out_dtype) -> Tensor",
    _scaled_mm,
    _fake,
    category="gemm",
)
scaled_mm.register_kernel("cuda")(_scaled_mm_cuda)
