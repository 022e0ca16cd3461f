"""fusiontune's custom ops (namespace ``torch.ops.fusiontune``): unfused building blocks and their fused forms.

Importing this package registers every op. Each op has a reference implementation, which is the definition of its
numerics (see ``numerics``), and a fake kernel so graphs trace without real data.
"""

import importlib.util

from . import (  # noqa: F401  (registers ops)
    act_padding, act_quant, activation, allreduce_rms, attention, collectives, gemm_comms, kv_cache, linear, norm,
    norm_quant, quant, rope,
)

if importlib.util.find_spec("triton") is not None:  # CUDA kernels for the row-wise ops
    from . import triton_ops  # noqa: F401
from .act_quant import ACT_QUANT_SCHEMES, act_quant_name
from .library import NAMESPACE, overload
from .norm_quant import rms_norm_quant_name
from .quant import QUANT_SCHEMES, QuantScheme

__all__ = [
    "ACT_QUANT_SCHEMES",
    "NAMESPACE",
    "QUANT_SCHEMES",
    "QuantScheme",
    "act_quant_name",
    "overload",
    "rms_norm_quant_name",
]
