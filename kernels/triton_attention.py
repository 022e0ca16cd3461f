"""The Triton flash-attention kernels behind ``attention`` / ``paged_attention`` and their FP8 forms on CUDA.

One program takes a block of queries of one head and streams the keys and values of its KV head up to the causal
edge, keeping a running max and sum (online softmax, in fp32, exp2 with log2(e) folded into the scale). The
normalised result is rounded to the activation dtype and then, for the fused op, quantised as ``numerics`` does
(multiply by the IEEE reciprocal of the scale, clamp to +-448, round to nearest even): the fused op therefore
equals this kernel's bf16 output quantised by the quant op, bit for bit.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .numerics import FP8_DTYPE, FP8_MAX
from .triton_rows import fp8_codes, reciprocal


@triton.jit
def _softmax_step(q, k, v, valid, qk_scale, m_i, l_i, acc, MASKED: tl.constexpr):
    """One block of keys into the running max ``m_i``, sum ``l_i`` and accumulator ``acc`` (online softmax, base 2).
    With ``MASKED``, scores where ``valid`` is false count as -inf; without, every score counts (a block wholly
    below the causal diagonal skips the select: the same values, less work)."""
    s = tl.dot(q, k)
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # the scale is positive: max(s) * scale = max(s * scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # one fused multiply-add per score
    alpha = tl.exp2(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _store_output(out_at, o, row_mask, quant_scale_ptr, OUT_FP8: tl.constexpr, FP8_MAX_C: tl.constexpr):
    """Rows already normalised and rounded to the activation dtype: stored as they are, or (the fused op) quantised
    with the static scale first."""
    if OUT_FP8:
        o = fp8_codes(o.to(tl.float32), reciprocal(tl.load(quant_scale_ptr)), FP8_MAX_C)
    tl.store(out_at, o, mask=row_mask[:, None])


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, quant_scale_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t,
    num_tokens, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_FP8: tl.constexpr, FP8_MAX_C: tl.constexpr,
):
    # Program (head, query block) on grid axes (0, 1), query blocks last first: the blocks with the most keys start
    # first and the short ones fill the tail, and the heads of one KV group run side by side (their keys and values
    # stay in L2).
    head = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    kv_head = head // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    cols0 = tl.arange(0, BLOCK_N)
    row_mask = rows < num_tokens
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * q_stride_t + head * q_stride_h + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Key blocks wholly before this query block: every key visible to every query, no mask. Then the blocks that
    # straddle the diagonal, masked. The same blocks in the same order as one masked loop, so the same values.
    below = start_m // BLOCK_N * BLOCK_N
    for start_n in range(0, below, BLOCK_N):
        cols = start_n + cols0
        k = tl.load(k_ptr + cols[None, :].to(tl.int64) * k_stride_t + kv_head * k_stride_h + dims[:, None])
        v = tl.load(v_ptr + cols[:, None].to(tl.int64) * v_stride_t + kv_head * v_stride_h + dims[None, :])
        m_i, l_i, acc = _softmax_step(q, k, v, None, qk_scale, m_i, l_i, acc, False)
    end = tl.minimum(start_m + BLOCK_M, num_tokens)
    for start_n in range(below, end, BLOCK_N):
        cols = start_n + cols0
        col_mask = cols < num_tokens
        k = tl.load(k_ptr + cols[None, :].to(tl.int64) * k_stride_t + kv_head * k_stride_h + dims[:, None],
                    mask=col_mask[None, :], other=0.0)
        v = tl.load(v_ptr + cols[:, None].to(tl.int64) * v_stride_t + kv_head * v_stride_h + dims[None, :],
                    mask=col_mask[:, None], other=0.0)
        causal = (rows[:, None] >= cols[None, :]) & col_mask[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, causal, qk_scale, m_i, l_i, acc, True)
    out_at = out_ptr + rows[:, None].to(tl.int64) * out_stride_t + head * D + dims[None, :]
    _store_output(out_at, (acc / l_i[:, None]).to(q_ptr.dtype.element_ty), row_mask, quant_scale_ptr, OUT_FP8,
                  FP8_MAX_C)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, out_ptr, quant_scale_ptr,
    q_stride_b, q_stride_h, table_stride, out_stride_b, context_len, qk_scale,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, OUT_FP8: tl.constexpr, FP8_MAX_C: tl.constexpr,
):
    # Program (sequence, KV head): that head's GROUP query heads (padded to GROUP_ROWS >= 16 rows for tl.dot) against
    # the sequence's cached tokens, BLOCK_N at a time, each token found through the block table.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    rows = tl.arange(0, GROUP_ROWS)
    row_mask = rows < GROUP
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + seq * q_stride_b + (kv_head * GROUP + rows)[:, None] * q_stride_h + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, D], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, context_len, BLOCK_N):
        tokens = start + offs
        valid = tokens < context_len
        block = tl.load(block_table_ptr + seq * table_stride + tokens // CACHE_BLOCK, mask=valid, other=0)
        slot = block.to(tl.int64) * CACHE_BLOCK + tokens % CACHE_BLOCK
        at = (slot * KV_HEADS + kv_head) * D
        k = tl.load(k_cache_ptr + at[None, :] + dims[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + at[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, valid[None, :], qk_scale, m_i, l_i, acc, True)
    out_at = out_ptr + seq * out_stride_b + (kv_head * GROUP + rows)[:, None] * D + dims[None, :]
    _store_output(out_at, (acc / l_i[:, None]).to(q_ptr.dtype.element_ty), row_mask, quant_scale_ptr, OUT_FP8,
                  FP8_MAX_C)


def paged_attention(q, k_cache, v_cache, block_table, context_len, scale, quant_scale=None, out=None):
    """One launch of (sequences x KV heads) programs; no split over the context (long contexts at small batch leave
    the GPU under-filled)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the Triton attention kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = q.new_empty((batch, heads * head_dim), dtype=FP8_DTYPE if quant_scale is not None else q.dtype)
    if batch == 0:
        return out
    group = heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_table, out, quant_scale if quant_scale is not None else q,
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), context_len, scale * math.log2(math.e),
        GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), KV_HEADS=kv_heads, D=head_dim,
        CACHE_BLOCK=k_cache.shape[1], BLOCK_N=64, OUT_FP8=quant_scale is not None, FP8_MAX_C=FP8_MAX, num_warps=4,
    )
    return out


def paged_attention_quant_fp8_static(q, k_cache, v_cache, block_table, context_len, scale, quant_scale, out=None):
    return paged_attention(q, k_cache, v_cache, block_table, context_len, scale, quant_scale, out)


def _blocks(num_tokens: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages): 16-query blocks for decode-sized batches, else 128 x 64 with 8 warps and 3
    stages, the best or within 5% of it for bf16 and FP8 output at 512, 4096 and 16384 tokens of 32 x 128 heads on
    the H100 (scripts/probe_attention.py; docs/data/2026-11-24-h100-probe-attention.md)."""
    if num_tokens <= 16:
        return 16, 64, 4, 2
    return 128, 64, 8, 3


def attention(q, k, v, scale, quant_scale=None, out=None):
    tokens, heads, head_dim = q.shape
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the Triton attention kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads do not group over {k.shape[1]} KV heads")
    q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        dtype = FP8_DTYPE if quant_scale is not None else q.dtype
        out = q.new_empty((tokens, heads * head_dim), dtype=dtype)
    if tokens == 0:
        return out
    block_m, block_n, warps, stages = _blocks(tokens)
    _attention_kernel[(heads, triton.cdiv(tokens, block_m))](
        q, k, v, out, quant_scale if quant_scale is not None else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        tokens, scale * math.log2(math.e),
        GROUP=heads // k.shape[1], D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        OUT_FP8=quant_scale is not None, FP8_MAX_C=FP8_MAX, num_warps=warps, num_stages=stages,
    )
    return out


def attention_quant_fp8_static(q, k, v, scale, quant_scale, out=None):
    return attention(q, k, v, scale, quant_scale, out)
