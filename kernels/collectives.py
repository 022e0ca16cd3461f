"""Tensor-parallel collectives as opaque custom ops: all-reduce, and the reduce-scatter / all-gather pair that
sequence parallelism puts in its place.

Keeping each collective a single named node (rather than c10d's functional pair collective + wait_tensor) gives
the collective fusions one thing to match, and runs the same under gloo (CPU) and NCCL (GPU). The process group is
named by its ``group_name`` so the graph stays a pure function of strings and tensors. Every op splits and joins
along dim 0 (tokens), in rank order.

On CUDA the all-reduce is the one a serving engine runs at that size (``symm_mem``: torch's symmetric-memory
one-shot or two-shot below their bounds, NCCL above, or as ``collectives.allreduce`` forces); elsewhere the
process group's own (gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from . import symm_mem
from .library import define_op


def process_group(group_name: str) -> dist.ProcessGroup:
    return distributed_c10d._resolve_process_group(group_name)


def group_size(group_name: str) -> int:
    return dist.get_world_size(process_group(group_name))


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """FP8 travels as its bytes: gloo has no float8 types, and a gather moves bits, it does no arithmetic."""
    return x.view(torch.uint8) if x.element_size() == 1 and x.is_floating_point() else x


def all_reduced(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """A new tensor: ``x`` summed over the named process group by its backend (gloo or NCCL), eagerly."""
    group = process_group(group_name)
    out = x.clone()
    dist.all_reduce(out, group=group)
    symm_mem.record(dist.get_backend(group))
    return out


def all_reduced_cuda(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x`` summed over the group by the all-reduce ``symm_mem.allreduce_method`` picks for its size."""
    method = symm_mem.allreduce_method(x.numel() * x.element_size(), group_size(group_name))
    if method == "nccl":
        return all_reduced(x, group_name)
    symm_mem.record(f"symm-mem {method}")
    return symm_mem.symm_mem_all_reduce(x, group_name, method)


def reduce_scattered(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """This rank's rows of ``x`` summed over the group: rows [rank * n / tp, (rank + 1) * n / tp)."""
    tp = group_size(group_name)
    if x.shape[0] % tp:
        raise ValueError(f"reduce_scatter: {x.shape[0]} rows do not split over TP={tp}")
    group = process_group(group_name)
    if dist.get_backend(group) == "gloo":
        # gloo's reduce_scatter_tensor returns wrong sums for bfloat16 (torch 2.13: off by up to 10 on N(0, 1)
        # inputs); its all-reduce is right, so CPU runs take their rows of the all-reduced tensor.
        return all_reduced(x, group_name).chunk(tp)[dist.get_rank(group)].clone()
    out = x.new_empty((x.shape[0] // tp, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    symm_mem.record(f"reduce-scatter {dist.get_backend(group)}")
    return out


def all_gathered(x: torch.Tensor, num_rows: int, group_name: str) -> torch.Tensor:
    """Every rank's ``x`` stacked along dim 0, in rank order (``num_rows`` = the result's rows, for the graph)."""
    tp = group_size(group_name)
    if x.shape[0] * tp != num_rows:
        raise ValueError(f"all_gather: {x.shape[0]} rows x TP={tp} != num_rows={num_rows}")
    out = x.new_empty((num_rows, *x.shape[1:]))
    group = process_group(group_name)
    dist.all_gather_into_tensor(_as_bytes(out), _as_bytes(x.contiguous()), group=group)
    symm_mem.record(f"all-gather {dist.get_backend(group)}")
    return out


def own_rows(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """A copy of this rank's rows of a tensor every rank holds whole (the residual, where SP starts)."""
    group = process_group(group_name)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[0] % tp:
        raise ValueError(f"shard_rows: {x.shape[0]} rows do not split over TP={tp}")
    return x.chunk(tp)[rank].clone()


def _fake_same(x, group_name):
    return torch.empty_like(x)


def _fake_rows_split(x, group_name):
    return x.new_empty((x.shape[0] // group_size(group_name), *x.shape[1:]))


def _fake_gathered(x, num_rows, group_name):
    return x.new_empty((num_rows, *x.shape[1:]))


all_reduce = define_op("all_reduce", "(Tensor x, str group_name) -> Tensor", all_reduced, _fake_same,
                       category="collective")
all_reduce.register_kernel("cuda")(all_reduced_cuda)
reduce_scatter = define_op("reduce_scatter", "(Tensor x, str group_name) -> Tensor", reduce_scattered,
                           _fake_rows_split, category="collective")
all_gather = define_op("all_gather", "(Tensor x, SymInt num_rows, str group_name) -> Tensor", all_gathered,
                       _fake_gathered, category="collective")
shard_rows = define_op("shard_rows", "(Tensor x, str group_name) -> Tensor", own_rows, _fake_rows_split,
                       category="collective")
