"""Attention and attention + FP8 quant: the reference against a float64 softmax, the Triton kernel (interpreter on
CPU, the GPU when there is one) against the reference on poisoned outputs, the fused FP8 form against the kernel's
own output quantised by the quant op, and fuse_attn_quant on the compiled model.

Tolerances. The kernel and the reference both accumulate in fp32 and round once to the output dtype, but in other
orders, and the kernel rounds the softmax probabilities to the input dtype before the PV product (as flash
attention does). Each output is a convex combination of values, so its error is at most the probabilities'
relative rounding (eps of the dtype) times max |v|: the bound is 2 eps(dtype) max|v| (fp32 on CPU: 1e-5 of it,
summation order only). The fused FP8 output must equal the quant op applied to the kernel's output code for code
on the GPU; in the interpreter only its known fp32 -> e4m3 dropped-carry defect may differ
(tests/test_triton_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from fusiontune.harness.model import DecoderStack
from fusiontune.harness.presets import build_model_config
from fusiontune.kernels import attention, numerics
from fusiontune.passes.config import resolve
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

triton = pytest.importorskip("triton")
from fusiontune.kernels import triton_attention  # noqa: E402
from test_triton_kernels import DEVICE, ON_GPU, assert_codes, poisoned  # noqa: E402

# bf16 dots are wrong in Triton's interpreter (triton 3.9: garbage of 1e8), so on CPU the kernel runs fp16 / fp32.
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]
TOKENS = [1, 7, 130, 4097] if ON_GPU else [1, 7, 130]
HEADS = [(32, 8, 128), (64, 8, 64)] if ON_GPU else [(4, 2, 64), (3, 1, 128)]


def qkv(tokens, heads, kv_heads, head_dim, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(tokens, h, head_dim, generator=g, device=DEVICE).to(dtype)
                 for h in (heads, kv_heads, kv_heads))


def bound(v, dtype):
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    return eps * v.float().abs().max().item()


def test_reference_is_causal_grouped_softmax_attention():
    q, k, v = (x.cpu().double() for x in qkv(9, 4, 2, 16, torch.float32, 0))
    got = attention.causal_attention(q, k, v, 0.25).view(9, 4, 16)
    for head in range(4):
        scores = (q[:, head] @ k[:, head // 2].t()) * 0.25
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(got[:, head], scores.softmax(-1) @ v[:, head // 2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}")
@pytest.mark.parametrize("tokens", TOKENS)
def test_kernel_matches_reference_and_fused_quant_matches_unfused(tokens, heads, dtype):
    q, k, v = qkv(tokens, *heads, dtype, seed=tokens)
    scale = heads[2] ** -0.5
    want = attention.causal_attention(q, k, v, scale)
    got = triton_attention.attention(q, k, v, scale, out=poisoned(want.shape, dtype))
    assert torch.isfinite(got).all(), "an output element was not written"
    assert (got.float() - want.float()).abs().max().item() <= bound(v, dtype)
    quant_scale = torch.tensor([want.float().abs().max().item() / 300], device=DEVICE)  # some values clamp
    fused = triton_attention.attention_quant_fp8_static(q, k, v, scale, quant_scale,
                                                        out=poisoned(want.shape, numerics.FP8_DTYPE))
    counts = assert_codes(fused, numerics.quant_fp8_static(got, quant_scale))
    if ON_GPU:
        assert counts["differ"] == 0, counts


def test_kernel_reads_heads_split_from_qkv_in_place():
    """The model hands the kernel views of the qkv projection (tokens apart by the qkv row stride)."""
    qkv_rows = torch.randn(11, 6 * 64, device=DEVICE, dtype=DTYPES[0])
    q, k, v = (t.view(11, -1, 64) for t in qkv_rows.split([4 * 64, 64, 64], dim=-1))
    want = attention.causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    got = triton_attention.attention(q, k, v, 0.125)
    assert (got.float() - want.float()).abs().max().item() <= bound(v, DTYPES[0])


def test_unfused_attention_runs_the_faster_kernel_for_its_size_and_says_which():
    """Issue 22's baseline: below ``SDPA_MIN_TOKENS`` our Triton kernel, from there SDPA with cuDNN's first (on
    CUDA; the CPU runs its math backend), each matching the reference, and each recorded for the row."""
    from fusiontune.kernels import implementations
    from fusiontune.kernels.attention import SDPA_MIN_TOKENS
    from fusiontune.kernels.triton_ops import _attention

    for tokens, which in ((7, "fusiontune triton"), (SDPA_MIN_TOKENS + 1, "sdpa (cudnn first)")):
        q, k, v = qkv(tokens, *HEADS[0], DTYPES[0], seed=tokens)
        implementations.forget()
        got = _attention(q, k, v, HEADS[0][2] ** -0.5)
        want = attention.causal_attention(*(t.float() for t in (q, k, v)), HEADS[0][2] ** -0.5)
        assert (got.float() - want).abs().max().item() <= bound(v, DTYPES[0]), tokens
        assert implementations.take(implementations.ATTENTION) == which


def test_the_fused_attention_quant_op_runs_the_faster_way_for_the_size_and_records_it(monkeypatch):
    """Our fused kernel below SDPA_QUANT_MIN_TOKENS; from there cuDNN's attention (through SDPA: its math backend
    on CPU) and then the quant kernel. Each equals the attention it ran quantised by the quant op, code for code (in
    the interpreter up to its e4m3 dropped carry), and is recorded, the second as not fused."""
    from fusiontune.kernels import implementations
    from fusiontune.kernels.triton_ops import _attention_quant, cudnn_attention

    if not ON_GPU:  # the interpreter takes a program at a time: the rule at a smaller size
        monkeypatch.setattr(attention, "SDPA_QUANT_MIN_TOKENS", 300)
    quant_scale = torch.tensor([0.05], device=DEVICE)
    for tokens, which in ((7, attention.OUR_FUSED_KERNEL),
                          (attention.SDPA_QUANT_MIN_TOKENS, attention.SDPA_THEN_QUANT)):
        q, k, v = qkv(tokens, *HEADS[0], DTYPES[0], seed=tokens)
        scale = HEADS[0][2] ** -0.5
        implementations.forget()
        got = _attention_quant(q, k, v, scale, quant_scale)
        assert implementations.take(implementations.ATTENTION) == which
        if which == attention.OUR_FUSED_KERNEL:
            ran = triton_attention.attention(q, k, v, scale)
        else:
            ran = cudnn_attention(q, k, v, scale)
        counts = assert_codes(got, numerics.quant_fp8_static(ran, quant_scale))
        if ON_GPU:
            assert counts["differ"] == 0, (tokens, counts)
    assert "(not fused)" in attention.SDPA_THEN_QUANT


def test_a_config_whose_attention_sums_in_another_order_than_all_offs_is_said_to():
    """The correctness check widens its allowance only where the fused attention + quant (ours) meets cuDNN's
    attention in all-off, not below SDPA_MIN_TOKENS (both ours: bit for bit), not where the fused op runs cuDNN's
    attention then the quant (all-off's attention, then the same quant) and not for paged decode."""
    big, small = attention.SDPA_MIN_TOKENS, attention.SDPA_MIN_TOKENS - 1
    fused = attention.OUR_FUSED_KERNEL
    assert attention.rounds_otherwise({fused}, big) and not attention.rounds_otherwise({fused}, small)
    assert not attention.rounds_otherwise({attention.SDPA_THEN_QUANT}, attention.SDPA_QUANT_MIN_TOKENS)
    assert not attention.rounds_otherwise({attention.SDPA_KERNEL}, big)
    assert attention.rounds_otherwise({attention.SDPA_KERNEL}, small)
    assert not attention.rounds_otherwise({f"{attention.OUR_KERNEL} (paged decode, fused with the quant)"}, big)
    assert not attention.rounds_otherwise(set(), big)  # on CPU nothing is recorded: the reference everywhere


@pytest.mark.slow
def test_fuse_attn_quant_fires_once_per_layer_bit_exact():
    cfg = build_model_config("tiny", num_layers=2, quant="fp8-static")
    model = DecoderStack(cfg, seed=3)
    inputs = [torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(cfg.torch_dtype)
              for n in (5, 17)]
    model.calibrate_static_scales(inputs[1])
    outputs, managers = [], []
    with torch.no_grad():
        for on in (False, True):
            manager = PassManager(resolve({"fuse_attn_quant": on}, level=0, platform=Platform(hidden_size=256)))
            torch._dynamo.reset()
            fn = torch.compile(model, dynamic=True, options={"post_grad_custom_post_pass": manager,
                                                             "fx_graph_cache": False})
            outputs.append([fn(x) for x in inputs])
            managers.append(manager)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    fused = managers[1]
    assert fused.graphs_seen >= 1 and fused.matches["fuse_attn_quant"] == cfg.num_layers * fused.graphs_seen
    assert managers[0].matches["fuse_attn_quant"] == 0


BATCHES = [(1, 1), (3, 37), (7, 130), (64, 4097)] if ON_GPU else [(1, 1), (3, 37), (7, 130)]  # (sequences, context)


def paged_case(batch, context, heads, kv_heads, head_dim, dtype, seed):
    """A cache with spare blocks, each sequence's blocks scattered over it in a shuffled order."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    per_sequence = -(-context // 16)
    blocks = batch * per_sequence + 3
    k_cache, v_cache = (torch.randn(blocks, 16, kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
                        for _ in range(2))
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))[: batch * per_sequence]
    q = torch.randn(batch, heads, head_dim, generator=g, device=DEVICE).to(dtype)
    return q, k_cache, v_cache, table.view(batch, per_sequence).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}")
@pytest.mark.parametrize("batch, context", BATCHES)
def test_paged_decode_kernel_matches_reference_and_fused_quant_matches_unfused(batch, context, heads, dtype):
    q, k_cache, v_cache, table = paged_case(batch, context, *heads, dtype, seed=batch + context)
    scale = heads[2] ** -0.5
    want = attention.paged_decode_attention(q, k_cache, v_cache, table, context, scale)
    got = triton_attention.paged_attention(q, k_cache, v_cache, table, context, scale,
                                           out=poisoned(want.shape, dtype))
    assert torch.isfinite(got).all(), "an output element was not written"
    assert (got.float() - want.float()).abs().max().item() <= bound(v_cache, dtype)
    quant_scale = torch.tensor([want.float().abs().max().item() / 300], device=DEVICE)
    fused = triton_attention.paged_attention_quant_fp8_static(q, k_cache, v_cache, table, context, scale, quant_scale,
                                                              out=poisoned(want.shape, numerics.FP8_DTYPE))
    counts = assert_codes(fused, numerics.quant_fp8_static(got, quant_scale))
    if ON_GPU:
        assert counts["differ"] == 0, counts


def test_paged_reference_reads_each_sequence_through_its_block_table():
    q, k_cache, v_cache, table = (x.cpu().double() if x.is_floating_point() else x.cpu()
                                  for x in paged_case(2, 20, 4, 2, 16, torch.float32, seed=0))
    got = attention.paged_decode_attention(q, k_cache, v_cache, table, 20, 0.25).view(2, 4, 16)
    for seq in range(2):
        slots = [(int(table[seq, t // 16]), t % 16) for t in range(20)]
        for head in range(4):
            k = torch.stack([k_cache[b, o, head // 2] for b, o in slots])
            v = torch.stack([v_cache[b, o, head // 2] for b, o in slots])
            torch.testing.assert_close(got[seq, head], ((q[seq, head] @ k.t()) * 0.25).softmax(-1) @ v)
