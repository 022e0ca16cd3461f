"""FP8 e4m3 quantisation in the three schemes, and the table that names them.

``QUANT_SCHEMES`` is the single description of a scheme: its op, the extra arguments the op takes after the
tensor (static: the scale tensor; per-group: the group size), and whether scales come back. The fused ops and the
fusion passes are generated from it, so a scheme is added here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import numerics
from .library import define_op, overload


@dataclass(frozen=True)
class QuantScheme:
    name: str  # as written in sweep files: fp8-static, fp8-per-token, fp8-per-group
    suffix: str  # in op names: quant_<suffix>, rms_norm_quant_<suffix>, ...
    extra_schema: str  # schema of the arguments after the input tensor
    returns_scale: bool  # dynamic schemes return (codes, scales)
    reference: Callable  # numerics function: (x, *extras) -> codes or (codes, scales)

    @property
    def op_name(self) -> str:
        return f"quant_{self.suffix}"

    @property
    def num_extras(self) -> int:
        return self.extra_schema.count(",")

    @property
    def returns(self) -> str:
        return "(Tensor, Tensor)" if self.returns_scale else "Tensor"

    def overload(self) -> torch._ops.OpOverload:
        return overload(self.op_name)

    def scales_per_row(self, hidden: int, group_size: int = 0) -> int:
        """How many fp32 scales quantising one row writes: none (static), one (per token), one per group."""
        if not self.returns_scale:
            return 0
        return hidden // group_size if group_size else 1

    def scales_like(self, x: torch.Tensor, group_size: int = 0, width: int | None = None) -> torch.Tensor:
        """An empty scales tensor for quantising ``x`` (rows of ``width``, by default x's last dimension), in the
        layout every implementation returns (``numerics.token_major_scales``)."""
        per_row = self.scales_per_row(width or x.shape[-1], group_size)
        return x.new_empty((per_row, *x.shape[:-1]), dtype=torch.float32).movedim(0, -1)

    def fake(self, x: torch.Tensor, *extras):
        """Fake outputs of quantising ``x``: FP8 codes shaped like x, and for dynamic schemes the scales."""
        codes = torch.empty_like(x, dtype=numerics.FP8_DTYPE)
        if not self.returns_scale:
            return codes
        group_size = extras[0] if extras else 0  # a dynamic scheme's one extra argument is its group size
        return codes, self.scales_like(x, group_size)


FP8_STATIC = QuantScheme("fp8-static", "fp8_static", ", Tensor scale", False, numerics.quant_fp8_static)
FP8_PER_TOKEN = QuantScheme("fp8-per-token", "fp8_per_token", "", True, numerics.quant_fp8_per_token)
FP8_PER_GROUP = QuantScheme("fp8-per-group", "fp8_per_group", ", int group_size", True, numerics.quant_fp8_per_group)

QUANT_SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (FP8_STATIC, FP8_PER_TOKEN, FP8_PER_GROUP)}

for _scheme in QUANT_SCHEMES.values():
    define_op(
        _scheme.op_name,
        f"(Tensor x{_scheme.extra_schema}) -> {_scheme.returns}",
        _scheme.reference,
        _scheme.fake,
        category="quant",
    )
