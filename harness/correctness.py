"""When is a fused config's output "the same" as the all-off config's?

The fused ops compute exactly their unfused chains (same rounding points, see kernels/numerics.py), so on one
device the outputs are usually bit-identical. What may legitimately differ is Inductor's code around the custom
ops (another fusion boundary reorders fp32 sums, rounding to the output dtype once more or less). One such
difference is half an ulp of the output dtype at the largest magnitude; it can move an FP8 code by one step
(2^-3 relative for e4m3) in a later layer, which the following matmul averages over its K inputs. We allow
4 ulps of the output dtype relative to the output's magnitude, and 8 when activations pass through FP8.

At TP > 2 the all-reduce itself may differ between configs: implementations sum the TP partial results in
another order and precision (torch's symmetric-memory all-reduce adds in the input dtype in rank order, NCCL in
ring order, fusiontune's kernel in fp32 rounding once), and the collective fusions swap one for another. A sum of
TP terms is then rounded up to TP - 1 times instead of once, so the allowance scales by TP - 1 (at TP = 2 one
addition rounds once everywhere: the outputs match bit for bit, as measured). Anything beyond that is a wrong
kernel or a wrong rewrite, and the config is marked ``incorrect``.

FlashInfer's fused all-reduce + norm (``allreduce_backend: flashinfer``) sums as the chain does but normalises and
scales in its own order (``x * (1 / scale)``), so its rows round once more than the chain's: it gets the allowance
of one more rounding, at every TP size (measured at TP=2, FP8, 8 layers: 12 ulps of the output's magnitude, where
our kernel is bit-equal). So does the fused attention + FP8 quant where the all-off model runs cuDNN's attention
(from ``attention.SDPA_MIN_TOKENS`` tokens on CUDA): both sum in fp32 and round once to bf16, in other orders, and
an FP8 code can then move a step (measured on an H200, Llama-3.1-8B shape, 8 layers: 10.4 ulps of the output's
magnitude at 1024 and 4096 tokens, beyond the 8 of a bit-equal chain).
"""

from __future__ import annotations

import torch


def tolerance(dtype: torch.dtype, fp8: bool, reference_absmax: float, tp: int = 1, reordered: bool = False) -> float:
    """``reordered``: an op in the config rounds once more than its chain, or in another order (FlashInfer's fused
    all-reduce + norm; our fused attention + quant against cuDNN's attention)."""
    ulps = (8 if fp8 else 4) * (max(1, tp - 1) + reordered)
    return ulps * torch.finfo(dtype).eps * max(reference_absmax, 1.0)


def max_abs_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if output.shape != reference.shape:
        return float("inf")
    diff = (output.float() - reference.float()).abs()
    if not torch.isfinite(output.float()).all():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0
