"""fuse_attn_quant: attention (prefill or paged decode) -> FP8 static quant (o_proj's input) becomes attention
that writes FP8 itself."""

from __future__ import annotations

from fusiontune.kernels import QUANT_SCHEMES, overload

from .base import FusionPass
from .quant_rewrite import register_quant_fusion


class AttnQuantFusionPass(FusionPass):
    flag = "fuse_attn_quant"

    def __init__(self, config):
        super().__init__(config)
        fused = {overload("attention"): overload("attention_quant_fp8_static"),
                 overload("paged_attention"): overload("paged_attention_quant_fp8_static")}
        register_quant_fusion(self.patterns, QUANT_SCHEMES["fp8-static"], fused.get)
