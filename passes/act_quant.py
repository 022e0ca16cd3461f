"""fuse_act_quant: silu_and_mul -> FP8 quant (static, per-group) becomes one fused op."""

from __future__ import annotations

from fusiontune.kernels import ACT_QUANT_SCHEMES, act_quant_name, overload

from .base import FusionPass
from .quant_rewrite import register_quant_fusion


class ActQuantFusionPass(FusionPass):
    flag = "fuse_act_quant"

    def __init__(self, config):
        super().__init__(config)
        for scheme in ACT_QUANT_SCHEMES:
            fused = {overload("silu_and_mul"): overload(act_quant_name(scheme))}
            register_quant_fusion(self.patterns, scheme, fused.get)
