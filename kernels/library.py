"""One torch.library namespace for every fusiontune op, and the one way ops are defined in it.

Each op gets a reference implementation (runs on any device, and is what GPU kernels are checked against) and a
fake kernel (shapes and dtypes only) so that graphs trace under FakeTensorMode on CPU and GPU alike, and the
category a profile files its time under (``OP_CATEGORY``, one of ``CATEGORIES``), so that per-kernel reports
follow the op, not the name of whatever kernel implements it on a device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "fusiontune"

# Where a profile files an op's time: a building block, or the fused op that replaces some of them.
CATEGORIES = ("rms_norm", "quant", "fused rms+quant", "activation", "fused act+quant", "rope", "kv cache",
              "fused rope+kv cache", "fused qk-norm+rope", "attention", "fused attention+quant", "gemm",
              "collective", "fused allreduce+rms", "fused gemm+collective", "other")
OP_CATEGORY: dict[str, str] = {}  # op name (without namespace) -> one of CATEGORIES


def define_op(
    name: str,
    schema: str,
    reference: Callable,
    fake: Callable,
    category: str,
    mutates_args: Sequence[str] = (),
):
    """Register ``fusiontune::<name>`` with an explicit schema; returns the ``CustomOpDef``."""
    if category not in CATEGORIES:
        raise ValueError(f"{name}: category {category!r} is not one of {CATEGORIES}")
    OP_CATEGORY[name] = category
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", reference, mutates_args=tuple(mutates_args), schema=schema
    )
    op.register_fake(fake)
    return op


def overload(name: str) -> torch._ops.OpOverload:
    """``torch.ops.fusiontune.<name>.default``: the node target that passes match."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
