"""SiLU(gate) * up on a [..., 2 * d] gate_up projection: the unfused activation the act+quant fusion replaces."""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return numerics.silu_and_mul(x)


def _fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


silu_and_mul = define_op("silu_and_mul", "(Tensor x) -> Tensor", _silu_and_mul, _fake, category="activation")
