"""Fused (residual add +) RMSNorm -> FP8 quant, one op per quant scheme and norm kind.

``rms_norm_quant_<scheme>(x, weight, eps, *extras)`` and
``fused_add_rms_norm_quant_<scheme>(x, residual!, weight, eps, *extras)``: the norm's arguments first, then the
quant op's extra arguments, in the order of their unfused ops. The reference is literally the unfused chain, so
fused and unfused agree bit for bit; a GPU kernel must keep the rounding points in ``numerics``.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op
from .quant import QUANT_SCHEMES, QuantScheme


def rms_norm_quant_name(scheme: QuantScheme, with_residual: bool) -> str:
    return f"{'fused_add_' if with_residual else ''}rms_norm_quant_{scheme.suffix}"


def _define(scheme: QuantScheme, with_residual: bool) -> None:
    if with_residual:

        def reference(x, residual, weight, eps, *extras):
            residual.copy_(numerics.residual_add(x, residual))
            return scheme.reference(numerics.rms_norm(residual, weight, eps), *extras)

        def fake(x, residual, weight, eps, *extras):
            return scheme.fake(x, *extras)

        norm_schema = "Tensor x, Tensor(a!) residual, Tensor weight, float eps"
    else:

        def reference(x, weight, eps, *extras):
            return scheme.reference(numerics.rms_norm(x, weight, eps), *extras)

        def fake(x, weight, eps, *extras):
            return scheme.fake(x, *extras)

        norm_schema = "Tensor x, Tensor weight, float eps"
    define_op(
        rms_norm_quant_name(scheme, with_residual),
        f"({norm_schema}{scheme.extra_schema}) -> {scheme.returns}",
        reference,
        fake,
        category="fused rms+quant",
        mutates_args=("residual",) if with_residual else (),
    )


for _scheme in QUANT_SCHEMES.values():
    for _with_residual in (False, True):
        _define(_scheme, _with_residual)
