"""Residual add + RMSNorm -> zero-padding of the hidden size, as one op (what fuse_act_padding swaps in).

gpt-oss's hidden size 2880 is padded to a multiple of 256 (3072) before its MoE / MLP GEMM, whose kernels want
aligned widths. Unfused, the padded copy is a second pass over the normed activations; fused, the norm kernel
writes the padded row directly. ``fused_add_rms_norm_pad(x, residual!, weight, eps, padded_hidden)`` updates the
residual as ``fused_add_rms_norm`` does and returns the norm of the sum followed by zeros up to ``padded_hidden``.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def _fused_add_rms_norm_pad(x, residual, weight, eps, padded_hidden):
    residual.copy_(numerics.residual_add(x, residual))
    normed = numerics.rms_norm(residual, weight, eps)
    return torch.nn.functional.pad(normed, (0, padded_hidden - normed.shape[-1]))


def _fake(x, residual, weight, eps, padded_hidden):
    return x.new_empty((*x.shape[:-1], padded_hidden))


fused_add_rms_norm_pad = define_op(
    "fused_add_rms_norm_pad",
    "(Tensor x, Tensor(a!) residual, Tensor weight, float eps, int padded_hidden) -> Tensor",
    _fused_add_rms_norm_pad,
    _fake,
    category="rms_norm",
    mutates_args=("residual",),
)
