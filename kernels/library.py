"""One torch.library namespace for every fusiontune op, and the one way ops are defined in it.

Each op gets a reference implementation (runs on any device, and is what GPU kernels are checked against) and a
fake kernel (shapes and dtypes only) so that graphs trace under FakeTensorMode on CPU and GPU alike.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "fusiontune"


def define_op(
    name: str,
    schema: str,
    reference: Callable,
    fake: Callable,
    mutates_args: Sequence[str] = (),
):
    """Register ``fusiontune::<name>`` with an explicit schema; returns the ``CustomOpDef``."""
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", reference, mutates_args=tuple(mutates_args), schema=schema
    )
    op.register_fake(fake)
    return op


def overload(name: str) -> torch._ops.OpOverload:
    """``torch.ops.fusiontune.<name>.default``: the node target that passes match."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
