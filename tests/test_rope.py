"""Rotary embedding and the fused Q/K-norm + RoPE: the reference against a complex-number rotation in fp64, the
Triton kernel (the interpreter on CPU, the GPU when there is one) against the reference on poisoned outputs.

Tolerances: the kernel rounds where the reference rounds (fp32 products, then their difference, one rounding to
the dtype; ``enable_fp_fusion=False`` keeps the products apart), so results are equal except where the last bit
of rsqrt moves a normalised value across a rounding boundary: at most 2 ulps of the dtype, in a small fraction of
elements (the same bound as the row kernel's norms, tests/test_triton_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from fusiontune.kernels import numerics
from fusiontune.kernels.rope import split_heads

triton = pytest.importorskip("triton")
from fusiontune.kernels import triton_heads  # noqa: E402
from test_triton_kernels import DEVICE, DTYPES, ON_GPU, assert_values, poisoned  # noqa: E402

EPS = 1e-6
TOKENS = [1, 7, 65, 4097] if ON_GPU else [1, 7, 65]
HEADS = [(32, 8, 128), (64, 8, 64)] if ON_GPU else [(4, 2, 128), (3, 1, 64), (36, 4, 128)]  # 40: 3 programs of 16, the last half full


def rotary_cache(tokens, head_dim):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim // 2, device=DEVICE, dtype=torch.float32) * 2 / head_dim)
    angles = torch.outer(torch.arange(tokens, device=DEVICE, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_reference_rope_is_a_rotation_of_each_pair(is_neox):
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    cos, sin = rotary_cache(5, 64)
    cos, sin = cos.cpu().double(), sin.cpu().double()
    got = numerics.rope(x, cos, sin, is_neox)
    x1, x2 = (x[..., :32], x[..., 32:]) if is_neox else (x[..., 0::2], x[..., 1::2])
    rotated = torch.complex(x1, x2) * torch.complex(cos, sin)[:, None, :]  # (x1 + i x2) e^{i theta}
    want = (torch.cat([rotated.real, rotated.imag], -1) if is_neox
            else torch.stack([rotated.real, rotated.imag], -1).flatten(-2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fp32 arithmetic inside the reference
    assert not torch.allclose(numerics.rope(x, cos, sin, not is_neox), want)  # the two styles differ


def qkv_inputs(tokens, heads, dtype, seed):
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g, device=DEVICE).to(dtype)
    wq = (1 + 0.1 * torch.randn(head_dim, generator=g, device=DEVICE)).to(dtype)
    wk = (1 + 0.1 * torch.randn(head_dim, generator=g, device=DEVICE)).to(dtype)
    return qkv, wq, wk


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
def test_kernels_match_the_reference(tokens, dtype, heads, is_neox):
    num_heads, num_kv_heads, head_dim = heads
    qkv, wq, wk = qkv_inputs(tokens, heads, dtype, seed=tokens + head_dim)
    cos, sin = rotary_cache(tokens + 5, head_dim)  # positions from 5: at position 0 the rotation is the identity
    cos, sin = cos[5:], sin[5:]
    q, k = split_heads(qkv, num_heads, num_kv_heads, head_dim)  # strided views, as the Llama path passes them
    want_q, want_k = numerics.rope(q, cos, sin, is_neox), numerics.rope(k, cos, sin, is_neox)
    out = (poisoned(q.shape, dtype), poisoned(k.shape, dtype))
    triton_heads.rotary_embedding(q, k, cos, sin, is_neox, out=out)
    assert_values(out[0], want_q)
    assert_values(out[1], want_k)

    from fusiontune.kernels.rope import _qk_norm_rope

    want_q, want_k = _qk_norm_rope(qkv, wq, wk, cos, sin, EPS, num_heads, num_kv_heads, head_dim, is_neox)
    out = (poisoned(want_q.shape, dtype), poisoned(want_k.shape, dtype))
    triton_heads.qk_norm_rope(qkv, wq, wk, cos, sin, EPS, num_heads, num_kv_heads, head_dim, is_neox, out=out)
    assert_values(out[0], want_q)
    assert_values(out[1], want_k)


def test_fused_equals_the_unfused_chain_of_kernels():
    """What the pass relies on: the fused kernel computes what rms_norm then rotary_embedding computes."""
    from fusiontune.kernels.triton_rows import run_rows

    num_heads, num_kv_heads, head_dim = HEADS[0]
    qkv, wq, wk = qkv_inputs(33, HEADS[0], DTYPES[0], seed=5)
    cos, sin = rotary_cache(40, head_dim)
    cos, sin = cos[7:], sin[7:]
    q, k = split_heads(qkv, num_heads, num_kv_heads, head_dim)
    qn = run_rows(q.reshape(-1, head_dim), weight=wq, eps=EPS).view(q.shape)
    kn = run_rows(k.reshape(-1, head_dim), weight=wk, eps=EPS).view(k.shape)
    chain = triton_heads.rotary_embedding(qn, kn, cos, sin, True)
    fused = triton_heads.qk_norm_rope(qkv, wq, wk, cos, sin, EPS, num_heads, num_kv_heads, head_dim, True)
    assert torch.equal(fused[0], chain[0]) and torch.equal(fused[1], chain[1])


def test_q_and_k_apart_are_rotated_each_by_its_own_launch():
    """q and k that are not one buffer's adjacent heads (separate tensors) take a launch each (adjacent ones, the
    other tests' case, take one)."""
    num_heads, num_kv_heads, head_dim = HEADS[0]
    qkv, _, _ = qkv_inputs(3, HEADS[0], DTYPES[0], seed=9)
    cos, sin = rotary_cache(3, head_dim)
    q, k = (t.contiguous() for t in split_heads(qkv, num_heads, num_kv_heads, head_dim))
    assert not triton_heads._heads_of_one_row(q, k)
    out = (poisoned(q.shape, DTYPES[0]), poisoned(k.shape, DTYPES[0]))
    triton_heads.rotary_embedding(q, k, cos, sin, True, out=out)
    assert_values(out[0], numerics.rope(q, cos, sin, True))
    assert_values(out[1], numerics.rope(k, cos, sin, True))


@pytest.mark.parametrize("tokens", [1, 2])
def test_the_qkv_split_is_one_buffer_at_one_token_too(tokens):
    """At one token torch gives each head view of the qkv projection its own row stride (Q's 4096, K's 1024 here,
    not the buffer's): the split still counts as one buffer, so RoPE and RoPE + KV cache take one launch and no
    gathering copy."""
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=torch.bfloat16)
    q, k = split_heads(qkv, num_heads, num_kv_heads, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim:].unflatten(-1, (num_kv_heads, head_dim))
    assert triton_heads._heads_of_one_row(q, k) and triton_heads._heads_of_one_row(q, k, v)
    assert not triton_heads._heads_of_one_row(k, q)  # out of order
    past_a_gap = qkv[:, (num_heads + 1) * head_dim:(num_heads + 1 + num_kv_heads) * head_dim].unflatten(-1, (
        num_kv_heads, head_dim))
    assert not triton_heads._heads_of_one_row(q, past_a_gap)  # a head's width between them


@pytest.mark.parametrize("heads, block, want", [
    (40, 64, 16),   # Llama-3.1-8B at TP 1: 32 Q + 8 K heads of 128 in programs of 16 (2048 elements), the last half full
    (80, 64, 16),   # 70B's 64 + 16
    (20, 64, 16),   # TP 2's 16 + 4
    (5, 64, 8),     # an odd count: the power of two above it
    (2, 64, 2),     # few heads: no more slots than heads
    (40, 32, 32),   # heads of 64: 32 fit
    (3, 1024, 1),   # a head wider than a program's budget: one a program
])
def test_heads_per_program(heads, block, want):
    got = triton_heads.heads_per_program(heads, block)
    assert got == want
    assert got * 2 * block <= max(triton_heads.MAX_PROGRAM_ELEMENTS, 2 * block)
