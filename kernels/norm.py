"""RMSNorm and residual-add + RMSNorm, the unfused building blocks the norm+quant fusion replaces.

``fused_add_rms_norm`` updates ``residual`` in place (``residual <- x + residual``) and returns the norm of the
sum, as vLLM's op does; under torch.compile it therefore reaches the post-grad graph auto-functionalized.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return numerics.rms_norm(x, weight, eps)


def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    residual.copy_(numerics.residual_add(x, residual))
    return numerics.rms_norm(residual, weight, eps)


def _norm_fake(x, *args):
    return torch.empty_like(x)


rms_norm = define_op("rms_norm", "(Tensor x, Tensor weight, float eps) -> Tensor", _rms_norm, _norm_fake,
                     category="rms_norm")
fused_add_rms_norm = define_op(
    "fused_add_rms_norm",
    "(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor",
    _fused_add_rms_norm,
    _norm_fake,
    category="rms_norm",
    mutates_args=("residual",),
)
