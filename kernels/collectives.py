"""Tensor-parallel all-reduce as an opaque custom op.

Keeping the collective a single named node (rather than c10d's functional pair all_reduce + wait_tensor) gives the
collective fusions one thing to match, and runs the same under gloo (CPU) and NCCL (GPU). The process group is
named by its ``group_name`` so the graph stays a pure function of strings and tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .library import define_op


def all_reduced(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """A new tensor: ``x`` summed over the named process group (eagerly, gloo or NCCL)."""
    out = x.clone()
    dist.all_reduce(out, group=distributed_c10d._resolve_process_group(group_name))
    return out


def _fake(x, group_name):
    return torch.empty_like(x)


all_reduce = define_op("all_reduce", "(Tensor x, str group_name) -> Tensor", all_reduced, _fake)
