"""Causal self-attention over one sequence, and its fused form that writes FP8 (fuse_attn_quant).

``attention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], scale) -> [T, Hq * D]``, grouped-query (Hq a multiple of
Hkv), output heads flattened as o_proj reads them. ``attention_quant_fp8_static(q, k, v, scale, quant_scale)`` is
the same attention quantised to FP8 with a static scale, the input o_proj's FP8 GEMM needs: the attention kernel
quantises its own output instead of writing bf16 for a quant kernel to read back.

A decode step runs ``paged_attention(q [B, Hq, D], k_cache, v_cache, block_table, context_len, scale)`` instead:
each of B sequences has one new query token and attends to its first ``context_len`` cached tokens (the paged cache
of ``kv_cache``, blocks listed per sequence in ``block_table``), with the same FP8 form beside it.

The reference is torch's scaled_dot_product_attention (then ``numerics.quant_fp8_static``). On CUDA the fused op
runs our Triton flash-attention kernel (``triton_attention``), which rounds its fp32 result to the activation dtype
before quantising, so it equals our attention kernel followed by the quant op bit for bit. The unfused op runs the
faster kernel for the size, as a serving engine would (issue 22): ours below ``SDPA_MIN_TOKENS``, cuDNN's through
SDPA from there (``triton_ops``). From there the fused op's output rounds in another order than all-off's
(``rounds_otherwise``), and its speedup is against the faster kernel. From ``SDPA_QUANT_MIN_TOKENS`` up, cuDNN's
attention and then the quant kernel beat our fused kernel, so the fused op runs that pair there, as a serving
engine without a fused kernel this fast would: the rows record it (``implementations.ATTENTION``), and the report
says at which sizes the fusion ran no fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import numerics
from .library import define_op


# From this many tokens the unfused attention runs cuDNN's through SDPA, below it our Triton kernel: the crossover
# measured on an H200 (docs/benchmarks.md, fifteenth session, scripts/probe_attention_backends.py): ours 7.5 us
# against cuDNN's 7.2 at 128 tokens, 15.9 against 13.7 at 512, 31.6 against 32.6 at 1024, 94.4 against 83.4 at
# 2048 and 4369 against 3515 at 16384 (cuDNN 1.24x faster there).
SDPA_MIN_TOKENS = 256
# From this many tokens the fused attention + FP8 quant op runs cuDNN's attention and then the quant kernel: our
# fused kernel is the faster pair below (same H200 and probe: 15.7 against 16.9 us at 512 tokens, 31.6 against 36.8
# at 1024), slower from here (94.3 against 90.3 at 2048, 4423 against 3472 at 16384).
SDPA_QUANT_MIN_TOKENS = 2048
# What implementations.ATTENTION records for each way
SDPA_KERNEL = "sdpa (cudnn first)"
OUR_KERNEL = "fusiontune triton"
OUR_FUSED_KERNEL = f"{OUR_KERNEL} (fused with the quant)"
SDPA_THEN_QUANT = f"{SDPA_KERNEL}, then the quant kernel (not fused)"


def unfused_attention_kernel(tokens: int) -> str:
    """The kernel the unfused attention op runs on CUDA for ``tokens`` query tokens."""
    return SDPA_KERNEL if tokens >= SDPA_MIN_TOKENS else OUR_KERNEL


def fused_quant_attention_kernel(tokens: int) -> str:
    """What the fused attention + FP8 quant op runs on CUDA for ``tokens`` query tokens."""
    return SDPA_THEN_QUANT if tokens >= SDPA_QUANT_MIN_TOKENS else OUR_FUSED_KERNEL


def rounds_otherwise(ran: set[str], tokens: int) -> bool:
    """Whether the prefill attention kernels a config ran (as recorded, ``implementations.ATTENTION``) sum in
    another order than the one all-off runs at this size: ours, fused with the quant or not, against cuDNN's. (A
    decode step's paged attention is ours in every config.)"""
    prefill = [name for name in ran if "paged" not in name]
    return any((SDPA_KERNEL if name.startswith(SDPA_KERNEL) else OUR_KERNEL) != unfused_attention_kernel(tokens)
               for name in prefill)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    tokens, heads, head_dim = q.shape
    # [1, heads, T, D]: SDPA's fused CUDA backends (flash, cuDNN) take a batch dimension; without one it falls back
    # to the math backend, which is what Inductor's peer in bench-kernels then ran
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1).reshape(tokens, heads * head_dim)


def _attention_quant(q, k, v, scale, quant_scale):
    return numerics.quant_fp8_static(causal_attention(q, k, v, scale), quant_scale)


def _fake(q, k, v, scale, *quant_scale):
    dtype = numerics.FP8_DTYPE if quant_scale else q.dtype
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=dtype)


attention = define_op("attention", "(Tensor q, Tensor k, Tensor v, float scale) -> Tensor", causal_attention, _fake,
                      category="attention")
attention_quant_fp8_static = define_op(
    "attention_quant_fp8_static", "(Tensor q, Tensor k, Tensor v, float scale, Tensor quant_scale) -> Tensor",
    _attention_quant, _fake, category="fused attention+quant")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           context_len: int, scale: float) -> torch.Tensor:
    """One query token per sequence (q [B, Hq, D]) against the first ``context_len`` cached tokens of that sequence,
    whose blocks ``block_table[b]`` lists in order; the new token's own K and V are already in the cache."""
    batch, heads, head_dim = q.shape
    k, v = (c[block_table].flatten(1, 2)[:, :context_len] for c in (k_cache, v_cache))  # [B, L, Hkv, D]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                         enable_gqa=True)
    return out.reshape(batch, heads * head_dim)


def _paged_quant(q, k_cache, v_cache, block_table, context_len, scale, quant_scale):
    return numerics.quant_fp8_static(paged_decode_attention(q, k_cache, v_cache, block_table, context_len, scale),
                                     quant_scale)


def _paged_fake(q, k_cache, v_cache, block_table, context_len, scale, *quant_scale):
    return _fake(q, None, None, scale, *quant_scale)


PAGED_ARGS = "Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int context_len, float scale"
paged_attention = define_op("paged_attention", f"({PAGED_ARGS}) -> Tensor", paged_decode_attention, _paged_fake,
                            category="attention")
paged_attention_quant_fp8_static = define_op(
    "paged_attention_quant_fp8_static", f"({PAGED_ARGS}, Tensor quant_scale) -> Tensor", _paged_quant, _paged_fake,
    category="fused attention+quant")
