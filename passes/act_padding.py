"""fuse_act_padding: residual add + RMSNorm -> zero-padding of the hidden size becomes one op.

Matches ``constant_pad_nd(norm, [0, p], 0)`` (padding on the right of the last dimension, with zeros) whose input
is the only use of a ``fused_add_rms_norm`` result; the fused op writes the padded row directly.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Arg, CallFunction

from fusiontune.kernels import overload

from .base import FusionPass
from .quant_rewrite import register_consumer_fusion

aten = torch.ops.aten


def _padded_width(pad_node) -> list | None:
    """[padded width] for a right-side zero padding of the last dimension; None for any other padding."""
    pad = pad_node.args[1]
    value = pad_node.args[2] if len(pad_node.args) > 2 else 0.0
    val = pad_node.args[0].meta.get("val")
    if val is None or value != 0 or len(pad) != 2 or pad[0] != 0 or not isinstance(pad[1], int) or pad[1] <= 0:
        return None
    width = val.shape[-1]
    return [width + pad[1]] if isinstance(width, int) else None


class ActPaddingFusionPass(FusionPass):
    flag = "fuse_act_padding"

    def __init__(self, config):
        super().__init__(config)
        fused = {overload("fused_add_rms_norm"): overload("fused_add_rms_norm_pad")}
        for pattern in (CallFunction(aten.constant_pad_nd.default, Arg(), Arg(), Arg()),
                        CallFunction(aten.constant_pad_nd.default, Arg(), Arg())):
            register_consumer_fusion(self.patterns, pattern, fused.get, _padded_width)
