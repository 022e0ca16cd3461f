"""The Triton kernel for per-head work: rotary embedding, alone or after a per-head RMSNorm (Q/K norm).

One program rotates a block of heads of one token: it loads each head's two rotated halves (first / second half
for neox, even / odd elements for gptj) and that token's cos / sin, and writes the heads once. With ``NORM`` the
same program first takes each head's RMSNorm (its sum of squares as ``numerics.sum_of_squares``), which is what
makes the fused Q/K-norm + RoPE one read and one write of q and k instead of three of each. Q heads and K heads of one token are
adjacent in the qkv projection, so one launch covers both: programs with a head index below ``NQ`` read the Q
weight and write ``q_out``, the rest the K weight and ``k_out``.

Launched with ``enable_fp_fusion=False``: ``x1 * cos - x2 * sin`` must round both products before the difference,
as torch does, or the last bit differs (see ``numerics``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import squares_paired


@triton.jit
def _pairs_added(s):
    """[R, N] -> [R, N / 2]: columns 2i and 2i + 1 added."""
    return tl.sum(tl.reshape(s, (s.shape[0], s.shape[1] // 2, 2)), axis=2)


@triton.jit
def _head_squares(x1, x2, PAIRED: tl.constexpr, IS_NEOX: tl.constexpr):
    """[HEADS] fp64 sums of each head's squares from its two halves, as ``numerics.sum_of_squares`` forms them over
    the whole head: with ``PAIRED``, fp32 squares added in fixed pairs within groups of 8 consecutive elements (neox:
    each half is whole groups; gptj: element pairs are (x1[i], x2[i]), then pairs of those), the groups in fp64."""
    if PAIRED:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        if IS_NEOX:
            ga = _pairs_added(_pairs_added(_pairs_added(a * a)))
            gb = _pairs_added(_pairs_added(_pairs_added(b * b)))
            total = tl.sum(ga.to(tl.float64), axis=1) + tl.sum(gb.to(tl.float64), axis=1)
        else:
            total = tl.sum(_pairs_added(_pairs_added(a * a + b * b)).to(tl.float64), axis=1)
    else:
        a, b = x1.to(tl.float64), x2.to(tl.float64)
        total = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
    return total


@triton.jit
def _head_kernel(
    src_ptr, src_stride, q_out_ptr, k_out_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, cs_stride, eps, NQ, NK,
    k_cache_ptr, v_cache_ptr, slot_ptr, NV,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, NORM: tl.constexpr,
    IS_NEOX: tl.constexpr, CACHE: tl.constexpr, PAIRED: tl.constexpr,
):
    # Program (token, block of HEADS heads): a [HEADS, half] tile of each rotated half. A program of one head
    # moves 256 bytes, too little to amortise itself (measured on the H100: 19% of copy at large num_tokens).
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    i = tl.arange(0, BLOCK)
    col_mask = i < HALF
    if IS_NEOX:
        first, second = i, i + HALF
    else:
        first, second = 2 * i, 2 * i + 1
    mask = (heads < NQ + NK + NV)[:, None] & col_mask[None, :]
    row = src_ptr + token * src_stride + heads[:, None] * D
    x1 = tl.load(row + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(row + second[None, :], mask=mask, other=0.0)
    cos = tl.load(cos_ptr + token * cs_stride + i, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * cs_stride + i, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    is_q = (heads < NQ)[:, None]
    dtype = x1.dtype
    if NORM:
        wq1, wq2 = tl.load(wq_ptr + first, mask=col_mask), tl.load(wq_ptr + second, mask=col_mask)
        wk1, wk2 = tl.load(wk_ptr + first, mask=col_mask), tl.load(wk_ptr + second, mask=col_mask)
        w1 = tl.where(is_q, wq1[None, :], wk1[None, :])
        w2 = tl.where(is_q, wq2[None, :], wk2[None, :])
        squares = _head_squares(x1, x2, PAIRED, IS_NEOX)
        variance = (squares * (tl.full((), 1.0, tl.float64) / D)).to(tl.float32)
        inv = tl.rsqrt(variance + eps)[:, None]
        x1 = ((x1.to(tl.float32) * inv).to(dtype).to(tl.float32) * w1.to(tl.float32)).to(dtype)
        x2 = ((x2.to(tl.float32) * inv).to(dtype).to(tl.float32) * w2.to(tl.float32)).to(dtype)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (x1f * cos - x2f * sin).to(dtype)
    o2 = (x2f * cos + x1f * sin).to(dtype)
    q_at = q_out_ptr + (token * NQ + heads[:, None]) * D
    k_at = k_out_ptr + (token * NK + heads[:, None] - NQ) * D
    tl.store(q_at + first[None, :], o1, mask=mask & is_q)
    tl.store(q_at + second[None, :], o2, mask=mask & is_q)
    is_k = ((heads >= NQ) & (heads < NQ + NK))[:, None]
    tl.store(k_at + first[None, :], o1, mask=mask & is_k)
    tl.store(k_at + second[None, :], o2, mask=mask & is_k)
    if CACHE:  # the rotated K heads, and the V heads (after K in the qkv row) as they are, into the token's slot
        slot = tl.load(slot_ptr + token).to(tl.int64)
        kc_at = k_cache_ptr + (slot * NK + heads[:, None] - NQ) * D
        tl.store(kc_at + first[None, :], o1, mask=mask & is_k)
        tl.store(kc_at + second[None, :], o2, mask=mask & is_k)
        is_v = (heads >= NQ + NK)[:, None]
        vc_at = v_cache_ptr + (slot * NK + heads[:, None] - NQ - NK) * D
        tl.store(vc_at + first[None, :], x1, mask=mask & is_v)
        tl.store(vc_at + second[None, :], x2, mask=mask & is_v)


# A program's heads hold at most this many elements: 16 heads of 128. Timed 2026-12-07 on an H200
# (scripts/probe_head_blocks.py, docs/benchmarks.md, eighteenth session), Llama-shaped Q + K heads: programs of 16
# heads instead of 32 made Q/K norm + RoPE 14-25% faster from 4096 tokens and level below; with Q and K in one
# launch as well (``rotary_embedding``), RoPE went from 3.0-3.4 to 1.9-2.1 us at 64 tokens, 6-7% faster at 4096,
# level at one token and at 16384 tokens at hidden 8192, 1.5% slower at 16384 tokens at hidden 4096. Programs of 8
# heads (the largest power of two dividing 40, so that no slot is empty) were no better than 16 with a part-empty
# program.
MAX_PROGRAM_ELEMENTS = 2048


def heads_per_program(total_heads: int, block: int) -> int:
    """How many heads one program takes (a power of two; ``block`` = the padded half head): as many as fit
    ``MAX_PROGRAM_ELEMENTS``, fewer where there are fewer heads."""
    return min(triton.next_power_of_2(total_heads), max(1, MAX_PROGRAM_ELEMENTS // (2 * block)))


def _launch(src, src_stride, q_out, k_out, num_q, num_k, head_dim, cos, sin, is_neox, wq=None, wk=None, eps=0.0,
            cache=None):
    """``cache`` (k_cache, v_cache, slot_mapping): also write the rotated K heads and the V heads that follow them
    in ``src`` into the caches' slots."""
    tokens = q_out.shape[0]
    num_v = num_k if cache is not None else 0
    if tokens == 0 or num_q + num_k == 0:
        return
    half = head_dim // 2
    block = max(triton.next_power_of_2(half), 16)
    heads = heads_per_program(num_q + num_k + num_v, block)
    k_cache, v_cache, slots = cache if cache is not None else (src, src, src)
    _head_kernel[(tokens, triton.cdiv(num_q + num_k + num_v, heads))](
        src, src_stride, q_out, k_out, wq if wq is not None else src, wk if wk is not None else src,
        cos, sin, cos.stride(0), eps, num_q, num_k, k_cache, v_cache, slots, num_v,
        D=head_dim, HALF=half, BLOCK=block, HEADS=heads, NORM=wq is not None, IS_NEOX=is_neox,
        CACHE=cache is not None, PAIRED=squares_paired(head_dim, src.dtype),
        num_warps=4 if heads * block * 2 <= 2048 else 8, enable_fp_fusion=False,
    )


def rotary_embedding(q, k, cos, sin, is_neox, out=None):
    """Both tensors [T, heads, head_dim]: one launch for both where they are adjacent head ranges of one buffer (the
    qkv projection's split, the model's case: at one token and 64 a launch each was 0.05-0.2 us slower than
    Inductor's code on the H100, and 1.0-1.3 us slower than one launch at 64 tokens on an H200), else one launch
    each. ``out`` (q_out, k_out), contiguous, is written instead of new buffers: tests poison it."""
    q_out, k_out = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                                torch.empty_like(k, memory_format=torch.contiguous_format))
    if _heads_of_one_row(q, k):
        _launch(q, q.stride(0), q_out, k_out, q.shape[1], k.shape[1], q.shape[2], cos, sin, is_neox)
        return q_out, k_out
    for x, out in ((q, q_out), (k, k_out)):
        if x.stride(2) != 1 or x.stride(1) != x.shape[2]:  # heads of a token must be adjacent; tokens may be apart
            x = x.contiguous()  # (a head split of the qkv projection is read in place, as the fused op reads it)
        _launch(x, x.stride(0), out, out, x.shape[1], 0, x.shape[2], cos, sin, is_neox)
    return q_out, k_out


def qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, head_dim, is_neox, out=None):
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    tokens = qkv.shape[0]
    q_out, k_out = out if out is not None else (qkv.new_empty((tokens, num_heads, head_dim)),
                                                 qkv.new_empty((tokens, num_kv_heads, head_dim)))
    _launch(qkv, qkv.stride(0), q_out, k_out, num_heads, num_kv_heads, head_dim, cos, sin, is_neox,
            q_weight, k_weight, eps)
    return q_out, k_out


def _heads_of_one_row(*parts) -> bool:
    """Whether the [T, heads, head_dim] tensors are adjacent head ranges, in order, of one [T, ...] buffer (the
    split of the qkv projection). At one token torch reports each view's row stride as its own width (4096 for Q,
    1024 for K at Llama-3.1-8B's shape, not the buffer's 6144): until 2026-12-07 that sent RoPE at one token to two
    launches and RoPE + KV cache to a gathering copy first (RoPE 2.8 us on an H200 where the one launch of Q/K norm
    + RoPE took 1.9)."""
    first = parts[0]

    def stride_is(x, dim, want):  # a dimension of one element has no step to take: torch may report any stride
        return x.shape[dim] == 1 or x.stride(dim) == want

    return (all(stride_is(x, 0, first.stride(0)) and stride_is(x, 2, 1) and stride_is(x, 1, x.shape[2])
                and x.dtype == first.dtype and x.shape[0] == first.shape[0] for x in parts)
            and all(b.data_ptr() == a.data_ptr() + a.shape[1] * a.shape[2] * a.element_size()
                    for a, b in zip(parts, parts[1:])))


def rotary_embedding_and_cache(q, k, v, cos, sin, is_neox, k_cache, v_cache, slot_mapping, out=None):
    """One launch: Q and K heads rotated (written to q_out, k_out), rotated K and V written to their cache slots.
    q, k, v are read in place where they are the qkv projection's split (the model's case), else gathered."""
    if not _heads_of_one_row(q, k, v):
        qkv = torch.cat([x.reshape(x.shape[0], -1) for x in (q, k, v)], dim=1)
        q, k, v = (t.view(t.shape[0], -1, q.shape[2]) for t in qkv.split(
            [q.shape[1] * q.shape[2], k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]], dim=1))
    q_out, k_out = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                                torch.empty_like(k, memory_format=torch.contiguous_format))
    _launch(q, q.stride(0), q_out, k_out, q.shape[1], k.shape[1], q.shape[2], cos, sin, is_neox,
            cache=(k_cache, v_cache, slot_mapping))
    return q_out, k_out


@triton.jit
def _cache_write_kernel(k_ptr, v_ptr, k_stride, v_stride, k_cache_ptr, v_cache_ptr, slot_ptr, W,
                        BLOCK: tl.constexpr):
    # Program (token, 0 for K / 1 for V): the token's W = kv_heads * head_dim elements into its slot.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, W, BLOCK):
        cols = start + offs
        mask = cols < W
        if tl.program_id(1) == 0:
            tl.store(k_cache_ptr + slot * W + cols, tl.load(k_ptr + token * k_stride + cols, mask=mask), mask=mask)
        else:
            tl.store(v_cache_ptr + slot * W + cols, tl.load(v_ptr + token * v_stride + cols, mask=mask), mask=mask)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    """The unfused cache write: K and V of each token into its slot, one launch for both."""
    k, v = (x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous() for x in (k, v))
    width = k.shape[1] * k.shape[2]
    if k.shape[0]:
        _cache_write_kernel[(k.shape[0], 2)](k, v, k.stride(0), v.stride(0), k_cache, v_cache, slot_mapping, width,
                                             BLOCK=min(triton.next_power_of_2(width), 2048), num_warps=4)
