"""All-reduce -> residual add + RMSNorm (-> FP8 static quant) as one op: what fuse_allreduce_rms swaps in.

``all_reduce_fused_add_rms_norm[_quant_fp8_static](x, residual!, weight, eps, [scale,] group_name)``: x is a
rank's partial sum (a row-parallel GEMM's output); the op all-reduces it over the TP group, adds it to the
residual (updated in place) and returns the norm of the sum (quantised). The reference is the unfused chain, run
eagerly (gloo on CPU, NCCL on GPU), so the rewrite is checked under gloo. On CUDA the op is one Triton kernel over
symmetric memory that reduces, adds, normalises and quantises where the sum is formed (``triton_allreduce_rms``),
at the sizes where it measured faster than the unfused pair (``symm_mem.fused_method``); the unfused pair at others.
"""

from __future__ import annotations

import torch

from . import numerics
from .collectives import all_reduced
from .library import define_op

# Quant stages the fused op can end with: None (the norm alone) or a scheme with a static scale argument.
ALLREDUCE_RMS_QUANTS = (None, "fp8-static")


def allreduce_rms_name(quant: str | None) -> str:
    return "all_reduce_fused_add_rms_norm" + ("_quant_fp8_static" if quant else "")


def _define(quant: str | None) -> None:
    def reference(x, residual, weight, eps, *rest):
        *scale, group_name = rest
        residual.copy_(numerics.residual_add(all_reduced(x, group_name), residual))
        normed = numerics.rms_norm(residual, weight, eps)
        return numerics.quant_fp8_static(normed, scale[0]) if quant else normed

    def fake(x, residual, weight, eps, *rest):
        return torch.empty_like(x, dtype=numerics.FP8_DTYPE) if quant else torch.empty_like(x)

    schema = "(Tensor x, Tensor(a!) residual, Tensor weight, float eps, " + ("Tensor scale, " if quant else "")
    define_op(allreduce_rms_name(quant), schema + "str group_name) -> Tensor", reference, fake,
              category="fused allreduce+rms", mutates_args=("residual",))


for _quant in ALLREDUCE_RMS_QUANTS:
    _define(_quant)
