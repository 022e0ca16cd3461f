"""When is a fused config's output "the same" as the all-off config's?

The fused ops compute exactly their unfused chains (same rounding points, see kernels/numerics.py), so on one
device the outputs are usually bit-identical. What may legitimately differ is Inductor's code around the custom
ops (another fusion boundary reorders fp32 sums, rounding to the output dtype once more or less). One such
difference is half an ulp of the output dtype at the largest magnitude; it can move an FP8 code by one step
(2^-3 relative for e4m3) in a later layer, which the following matmul averages over its K inputs. We allow
4 ulps of the output dtype relative to the output's magnitude, and 8 when activations pass through FP8.
Anything beyond that is a wrong kernel or a wrong rewrite, and the config is marked ``incorrect``.
"""

from __future__ import annotations

import torch


def tolerance(dtype: torch.dtype, fp8: bool, reference_absmax: float) -> float:
    ulps = 8 if fp8 else 4
    return ulps * torch.finfo(dtype).eps * max(reference_absmax, 1.0)


def max_abs_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if output.shape != reference.shape:
        return float("inf")
    diff = (output.float() - reference.float()).abs()
    if not torch.isfinite(output.float()).all():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0
