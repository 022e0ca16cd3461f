"""GEMM fused with the collective beside it (AsyncTP): what fuse_gemm_comms swaps in after sequence parallelism.

After SP a row-parallel GEMM's output is reduce-scattered, and a column-parallel GEMM's input is all-gathered.
``matmul_reduce_scatter(a, b, group)`` = reduce_scatter(a @ b) and ``all_gather_matmul(a_shard, b, num_rows,
group)`` = all_gather(a_shard) @ b; the ``scaled_mm`` forms do the same around an FP8 scaled matmul (per-tensor or
per-token activation scales; a gathered FP8 activation keeps its per-tensor scale). The reference is that
decomposition, run eagerly, so the rewrite is checked under gloo on CPU.

On CUDA both forms run torch's symmetric-memory ops, which split the GEMM into per-rank chunks and overlap each
chunk's transfer with the next chunk's compute: ``fused_matmul_reduce_scatter`` / ``fused_all_gather_matmul``, and
for FP8 ``fused_scaled_matmul_reduce_scatter`` / ``fused_all_gather_scaled_matmul`` with cuBLASLt's row-wise scales
(a per-tensor activation scale broadcast to rows, as ``linear.scaled_mm`` does). Block-scaled FP8 decomposes.
"""

from __future__ import annotations

import torch

from . import collectives, symm_mem
from .collectives import all_gathered, reduce_scattered
from .library import define_op
from .linear import rowwise_scales, scaled_mm

SCALED_ARGS = "Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int group_size, ScalarType out_dtype"


def _matmul_reduce_scatter(a, b, group_name):
    return reduce_scattered(a @ b, group_name)


def _all_gather_matmul(a_shard, b, num_rows, group_name):
    return all_gathered(a_shard, num_rows, group_name) @ b


def _scaled_mm_reduce_scatter(a, a_scale, b, b_scale, group_size, out_dtype, group_name):
    return reduce_scattered(scaled_mm(a, a_scale, b, b_scale, group_size, out_dtype), group_name)


def _all_gather_scaled_mm(a_shard, a_scale, b, b_scale, group_size, out_dtype, num_rows, group_name):
    return scaled_mm(all_gathered(a_shard, num_rows, group_name), a_scale, b, b_scale, group_size, out_dtype)


def _rows_split(x: torch.Tensor, columns: int, group_name: str, dtype=None) -> torch.Tensor:
    return x.new_empty((x.shape[0] // collectives.group_size(group_name), columns), dtype=dtype or x.dtype)


matmul_reduce_scatter = define_op(
    "matmul_reduce_scatter", "(Tensor a, Tensor b, str group_name) -> Tensor", _matmul_reduce_scatter,
    lambda a, b, group_name: _rows_split(a, b.shape[1], group_name),
    category="fused gemm+collective")
all_gather_matmul = define_op(
    "all_gather_matmul", "(Tensor a_shard, Tensor b, SymInt num_rows, str group_name) -> Tensor", _all_gather_matmul,
    lambda a, b, num_rows, group_name: a.new_empty((num_rows, b.shape[1])),
    category="fused gemm+collective")
scaled_mm_reduce_scatter = define_op(
    "scaled_mm_reduce_scatter", f"({SCALED_ARGS}, str group_name) -> Tensor", _scaled_mm_reduce_scatter,
    lambda a, a_scale, b, b_scale, group_size, out_dtype, group_name: _rows_split(a, b.shape[0], group_name,
                                                                                  out_dtype),
    category="fused gemm+collective")
all_gather_scaled_mm = define_op(
    "all_gather_scaled_mm", f"({SCALED_ARGS}, SymInt num_rows, str group_name) -> Tensor", _all_gather_scaled_mm,
    lambda a, a_scale, b, b_scale, group_size, out_dtype, num_rows, group_name: a.new_empty(
        (num_rows, b.shape[0]), dtype=out_dtype),
    category="fused gemm+collective")


def _matmul_reduce_scatter_cuda(a, b, group_name):
    symm_mem.ensure_group(group_name)
    symm_mem.record("symm-mem matmul + reduce-scatter")
    return torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, group_name)


def _all_gather_matmul_cuda(a_shard, b, num_rows, group_name):
    symm_mem.ensure_group(group_name)
    symm_mem.record("symm-mem all-gather + matmul")
    _, (out,) = torch.ops.symm_mem.fused_all_gather_matmul(a_shard, [b], 0, group_name, return_A=False)
    return out


def _scaled_mm_reduce_scatter_cuda(a, a_scale, b, b_scale, group_size, out_dtype, group_name):
    if group_size:  # block scales: torch's fused op takes row-wise or per-tensor scales only
        return _scaled_mm_reduce_scatter(a, a_scale, b, b_scale, group_size, out_dtype, group_name)
    symm_mem.ensure_group(group_name)
    symm_mem.record("symm-mem FP8 matmul + reduce-scatter")
    scale_a, scale_b = rowwise_scales(a_scale, a.shape[0], b_scale)
    return torch.ops.symm_mem.fused_scaled_matmul_reduce_scatter(
        a, b.t(), scale_a, scale_b, "sum", 0, 0, group_name, [a.shape[0], b.shape[0]], out_dtype=out_dtype)


def _all_gather_scaled_mm_cuda(a_shard, a_scale, b, b_scale, group_size, out_dtype, num_rows, group_name):
    if group_size or a_scale.numel() != 1:  # the pass fuses per-tensor scales only; anything else decomposes
        return _all_gather_scaled_mm(a_shard, a_scale, b, b_scale, group_size, out_dtype, num_rows, group_name)
    symm_mem.ensure_group(group_name)
    symm_mem.record("symm-mem all-gather + FP8 matmul")
    scale_a, scale_b = rowwise_scales(a_scale, num_rows, b_scale)  # row-wise, replicated over the gathered rows
    _, (out,) = torch.ops.symm_mem.fused_all_gather_scaled_matmul(
        a_shard, [b.t()], scale_a, [scale_b], 0, group_name, [None], [None], [out_dtype], [False])
    return out


matmul_reduce_scatter.register_kernel("cuda")(_matmul_reduce_scatter_cuda)
all_gather_matmul.register_kernel("cuda")(_all_gather_matmul_cuda)
scaled_mm_reduce_scatter.register_kernel("cuda")(_scaled_mm_reduce_scatter_cuda)
all_gather_scaled_mm.register_kernel("cuda")(_all_gather_scaled_mm_cuda)
