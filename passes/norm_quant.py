"""fuse_norm_quant: rms_norm / fused_add_rms_norm -> FP8 quant (every scheme) becomes one fused op."""

from __future__ import annotations

from fusiontune.kernels import QUANT_SCHEMES, overload, rms_norm_quant_name

from .base import FusionPass
from .quant_rewrite import register_quant_fusion


class NormQuantFusionPass(FusionPass):
    flag = "fuse_norm_quant"

    def __init__(self, config):
        super().__init__(config)
        for scheme in QUANT_SCHEMES.values():
            fused = {
                overload("rms_norm"): overload(rms_norm_quant_name(scheme, with_residual=False)),
                overload("fused_add_rms_norm"): overload(rms_norm_quant_name(scheme, with_residual=True)),
            }
            register_quant_fusion(self.patterns, scheme, fused.get)
