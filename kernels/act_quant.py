"""Fused SiLU * Mul -> FP8 quant: ``silu_and_mul_quant_<scheme>(x, *extras)``.

Defined for the schemes vLLM fuses on NVIDIA and AMD (static per-tensor and per-token-group); per-token dynamic
quant after the activation is not a fusion the reference page lists.
"""

from __future__ import annotations

from . import numerics
from .quant import FP8_PER_GROUP, FP8_STATIC, QuantScheme
from .library import define_op

ACT_QUANT_SCHEMES: tuple[QuantScheme, ...] = (FP8_STATIC, FP8_PER_GROUP)


def act_quant_name(scheme: QuantScheme) -> str:
    return f"silu_and_mul_quant_{scheme.suffix}"


def _define(scheme: QuantScheme) -> None:
    def reference(x, *extras):
        return scheme.reference(numerics.silu_and_mul(x), *extras)

    def fake(x, *extras):
        return scheme.fake(x.new_empty((*x.shape[:-1], x.shape[-1] // 2)), *extras)

    define_op(act_quant_name(scheme), f"(Tensor x{scheme.extra_schema}) -> {scheme.returns}", reference, fake,
              category="fused act+quant")


for _scheme in ACT_QUANT_SCHEMES:
    _define(_scheme)
