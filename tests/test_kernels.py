"""Every fused op against its unfused chain (bit for bit), every op against an independent float64 computation,
and every fake kernel against its real one (torch.library.opcheck). Fresh random inputs each run, odd sizes."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from fusiontune.kernels import ACT_QUANT_SCHEMES, QUANT_SCHEMES, act_quant_name, rms_norm_quant_name
from fusiontune.kernels import implementations, numerics
from fusiontune.kernels.numerics import FP8_MAX, FP8_MIN_SCALE

ops = torch.ops.fusiontune
EPS = 1e-6
SHAPES = [(1, 2880), (7, 2880), (4097, 256), (33, 4096)]
# On the GPU, fused and unfused are different kernels: a rounding difference between them shows up about once per
# million elements, so the GPU also checks a shape with millions of them.
GPU_SHAPES = [(8192, 4096)]


def extras_for(scheme, hidden, device):
    if scheme.name == "fp8-static":
        return (torch.tensor([0.013], device=device),)
    if scheme.name == "fp8-per-group":
        return (64 if hidden % 128 else 128,)
    return ()


def rand(*shape, device, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def same(a, b) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and torch.equal(a, b)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
@pytest.mark.parametrize("scheme", QUANT_SCHEMES.values(), ids=lambda s: s.name)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_fused_norm_quant_equals_unfused_chain(device, shape, scheme, with_residual):
    if shape in GPU_SHAPES and device.type != "cuda":
        pytest.skip("the large shape checks the GPU kernels; on CPU fused and unfused share the reference")
    x, w = rand(*shape, device=device), rand(shape[1], device=device, scale=0.2) + 1
    extras = extras_for(scheme, shape[1], device)
    fused = getattr(ops, rms_norm_quant_name(scheme, with_residual))
    unfused_quant = getattr(ops, scheme.op_name)
    if with_residual:
        r_fused, r_unfused = rand(*shape, device=device), None
        r_unfused = r_fused.clone()
        got = as_tuple(fused(x, r_fused, w, EPS, *extras))
        want = as_tuple(unfused_quant(ops.fused_add_rms_norm(x, r_unfused, w, EPS), *extras))
        assert same(r_fused, r_unfused), "residual written differently"
    else:
        got = as_tuple(fused(x, w, EPS, *extras))
        want = as_tuple(unfused_quant(ops.rms_norm(x, w, EPS), *extras))
    assert len(got) == len(want)
    for g, u in zip(got, want):
        assert same(g, u)


@pytest.mark.parametrize("shape", [(1, 2 * 2880), (7, 2 * 2880), (4097, 512), (8192, 2 * 14336)])
@pytest.mark.parametrize("scheme", ACT_QUANT_SCHEMES, ids=lambda s: s.name)
def test_fused_act_quant_equals_unfused_chain(device, shape, scheme):
    if shape[0] == 8192 and device.type != "cuda":
        pytest.skip("the large shape checks the GPU kernels; on CPU fused and unfused share the reference")
    x = rand(*shape, device=device)
    extras = extras_for(scheme, shape[1] // 2, device)
    got = as_tuple(getattr(ops, act_quant_name(scheme))(x, *extras))
    want = as_tuple(getattr(ops, scheme.op_name)(ops.silu_and_mul(x), *extras))
    for g, u in zip(got, want):
        assert same(g, u)


def e4m3_spacing(v: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent e4m3 values around |v| (3 mantissa bits; subnormals below 2^-6)."""
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return torch.pow(2.0, exponent - 3)


def check_fp8_rounding(codes, x64, scale64):
    """Each code is the e4m3 value nearest to x/scale (float64), or the clamp bound beyond +-448."""
    target = (x64 / scale64).clamp(-FP8_MAX, FP8_MAX)
    got = codes.double()
    err = (got - target).abs()
    # Half a spacing, plus the fp32 roundings of 1/scale and x * (1/scale) before the rounding to e4m3.
    bound = 0.5 * e4m3_spacing(target).double() + target.abs() * 2.0**-22
    assert torch.all(err <= bound), f"{int((err > bound).sum())} codes are not nearest"
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("num_tokens", [1, 7, 4097])
def test_quant_schemes_against_float64(device, num_tokens):
    hidden = 2880
    x = rand(num_tokens, hidden, device=device, scale=3.0)
    x[0, :5] = torch.tensor([0.0, 1e-8, -1e3, 1e3, 448.0]).to(x.dtype)  # zero, tiny, beyond the clamp
    x64 = x.double()
    scale = torch.tensor([0.05], device=device)
    check_fp8_rounding(ops.quant_fp8_static(x, scale), x64, 0.05)

    codes, scales = ops.quant_fp8_per_token(x)
    want = (x64.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    torch.testing.assert_close(scales.double(), want, rtol=2**-23, atol=0)
    check_fp8_rounding(codes, x64, scales.double())

    codes, scales = ops.quant_fp8_per_group(x, 64)
    assert scales.shape == (num_tokens, hidden // 64)
    grouped = x64.view(num_tokens, -1, 64)
    want = (grouped.abs().amax(-1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    torch.testing.assert_close(scales.double(), want, rtol=2**-23, atol=0)
    check_fp8_rounding(codes.view(num_tokens, -1, 64), grouped, scales.double().unsqueeze(-1))


def test_all_zero_rows_get_the_floor_scale(device):
    codes, scales = ops.quant_fp8_per_token(torch.zeros(3, 64, device=device, dtype=torch.bfloat16))
    assert torch.all(scales == FP8_MIN_SCALE) and torch.all(codes.float() == 0)


def test_per_group_rejects_a_hidden_size_that_is_no_multiple():
    with pytest.raises(ValueError, match="2880 is not a multiple of 128"):
        ops.quant_fp8_per_group(torch.randn(2, 2880), 128)


@pytest.mark.parametrize("num_tokens", [1, 7, 4097])
def test_norms_and_activation_against_float64(device, num_tokens):
    hidden = 2880
    x, r = rand(num_tokens, hidden, device=device), rand(num_tokens, hidden, device=device)
    w = rand(hidden, device=device, scale=0.2) + 1
    ulp = torch.finfo(torch.bfloat16).eps

    def rms64(v):
        v = v.double()
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * w.double()

    # Two bf16 roundings (normalised value, then times weight): within 2 ulps of the exact value.
    torch.testing.assert_close(ops.rms_norm(x, w, EPS).double(), rms64(x), rtol=2 * ulp, atol=1e-6)
    residual = r.clone()
    out = ops.fused_add_rms_norm(x, residual, w, EPS)
    torch.testing.assert_close(residual.double(), x.double() + r.double(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(out.double(), rms64(residual), rtol=2 * ulp, atol=1e-6)

    gate_up = rand(num_tokens, 2 * hidden, device=device)
    g, u = gate_up[:, :hidden].double(), gate_up[:, hidden:].double()
    torch.testing.assert_close(ops.silu_and_mul(gate_up).double(), g * torch.sigmoid(g) * u, rtol=2 * ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [2880, 4096, 200, 7])
def test_sum_of_squares_is_fixed_pairs_in_fp32_then_fp64_or_all_fp64(dtype, hidden):
    """numerics.sum_of_squares, the order every norm kernel follows: a 16-bit row whose width is a multiple of 16
    adds its fp32 squares (exact) in fixed pairs within aligned groups of 8, then the groups in fp64; other rows sum
    every square in fp64. The grouped sum is not an order-free sum: rows with squares far apart in magnitude show
    it; the fp64 sum of the same groups in reversed order rounds to the same fp32 mean."""
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(16, hidden, generator=g) * torch.logspace(-4, 4, hidden)).to(dtype)
    got = numerics.sum_of_squares(x)
    if numerics.squares_paired(hidden, dtype):
        assert dtype != torch.float32 and hidden % 16 == 0
        squares = x.float().pow(2).view(16, hidden // 8, 8)
        pairs = squares[..., 0::2] + squares[..., 1::2]
        quads = pairs[..., 0::2] + pairs[..., 1::2]
        groups = (quads[..., 0] + quads[..., 1]).double()
        torch.testing.assert_close(got, groups.sum(-1, keepdim=True), rtol=0, atol=0)
        backwards = groups.flip(-1).cumsum(-1)[..., -1:]
        assert torch.equal((got / hidden).float(), (backwards / hidden).float())
    else:
        torch.testing.assert_close(got, x.double().pow(2).sum(-1, keepdim=True), rtol=0, atol=0)
    from fusiontune.kernels.triton_rows import inverse_width_bits  # what the kernels read: the same fp64 as 1 / H

    assert struct.unpack("<d", struct.pack("<q", inverse_width_bits(hidden)))[0] == 1.0 / hidden


# (512, 256): cuBLASLt's block-scaled GEMM on CUDA; (256, 208): K = 256 and a partial weight tile, which it gets
# wrong, so CUDA runs the reference GEMM there (kernels/linear.py).
@pytest.mark.parametrize("k, n", [(512, 256), (256, 208)], ids=["k512-n256", "k256-n208"])
@pytest.mark.parametrize("m", [1, 37])  # cuBLASLt's block scaling takes M = 4, 8, ... only: these are padded
@pytest.mark.parametrize("group_size", [0, 128])
def test_scaled_mm_against_float64(device, group_size, m, k, n):
    from fusiontune.kernels import linear

    linear._BLOCKWISE_REFUSED.clear()
    a = rand(m, k, device=device, dtype=torch.float32, scale=2)
    if group_size:
        a_codes, a_scale = ops.quant_fp8_per_group(a, group_size)
        a64 = (a_codes.double().view(m, -1, group_size) * a_scale.double().unsqueeze(-1)).view(m, k)
    else:
        a_codes, a_scale = ops.quant_fp8_per_token(a)
        a64 = a_codes.double() * a_scale.double()
    w = torch.randn(n, k, device=device)
    if group_size:  # per-group models carry block-quantised weights: group x group tiles, one scale each
        w_scale = numerics.weight_block_scales(w, group_size)
        per_element = numerics.expand_block_scales(w_scale, (n, k), group_size)
    else:
        w_scale = w.abs().amax(1) / FP8_MAX
        per_element = w_scale[:, None]
    w_codes = (w / per_element).to(torch.float8_e4m3fn)
    want = a64 @ (w_codes.double() * per_element.double()).t()
    implementations.forget()
    got = ops.scaled_mm(a_codes, a_scale, w_codes, w_scale, group_size, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # and it says which GEMM ran (rows record it): cuBLASLt's where it takes the shape, else the reference
    ran = (linear.REFERENCE_GEMM if device.type == "cpu" or (group_size and k < linear.MIN_BLOCKWISE_K)
           else linear.CUBLASLT_BLOCKWISE if group_size else linear.CUBLASLT_ROWWISE)
    assert implementations.take(implementations.GEMM) == ran
    # Exact products of FP8 values summed in fp32, then one bf16 rounding: within 1 bf16 ulp of the magnitude.
    tol = torch.finfo(torch.bfloat16).eps * want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= tol
    assert not linear._BLOCKWISE_REFUSED, "the CUDA GEMM fell back to the reference"


def all_ops_with_args(device):
    x, w, r = rand(5, 256, device=device), rand(256, device=device) + 1, rand(5, 256, device=device)
    scale = torch.tensor([0.02], device=device)
    cache = lambda: torch.zeros(2, 4, 1, 64, device=device, dtype=x.dtype)  # noqa: E731  (2 blocks of 4 slots)
    slots = torch.tensor([6, 0, 3, 1, 7], device=device)
    table = torch.randperm(10, device=device).view(5, 2)
    cases = {
        "rms_norm": (x, w, EPS),
        "fused_add_rms_norm": (x, r, w, EPS),
        "silu_and_mul": (x,),
        "quant_fp8_static": (x, scale),
        "quant_fp8_per_token": (x,),
        "quant_fp8_per_group": (x, 64),
        "scaled_mm": (x.to(torch.float8_e4m3fn), scale, r.to(torch.float8_e4m3fn), torch.ones(5, device=device),
                      0, torch.bfloat16),
        # qkv of 2 Q heads and 1 K / V head of 64 (256 columns; the V columns are not read)
        "rotary_embedding": (x.view(5, 4, 64)[:, :2], x.view(5, 4, 64)[:, 2:3], rand(5, 32, device=device),
                             rand(5, 32, device=device), True),
        "qk_norm_rope": (x, w[:64], w[64:128], rand(5, 32, device=device), rand(5, 32, device=device), EPS, 2, 1,
                         64, False),
        "fused_add_rms_norm_pad": (x, r, w, EPS, 320),
        # 2 Q heads, 1 K and 1 V head of 64 from the qkv row
        "reshape_and_cache": (x.view(5, 4, 64)[:, 2:3], x.view(5, 4, 64)[:, 3:], cache(), cache(), slots),
        "rotary_embedding_and_cache": (
            x.view(5, 4, 64)[:, :2], x.view(5, 4, 64)[:, 2:3], x.view(5, 4, 64)[:, 3:], rand(5, 32, device=device),
            rand(5, 32, device=device), True, cache(), cache(), slots),
        # 5 sequences, 20 cached tokens each in 2 blocks of 16, 2 KV heads
        "paged_attention": (x.view(5, 4, 64), rand(10, 16, 2, 64, device=device), rand(10, 16, 2, 64, device=device),
                            table, 20, 0.125),
        "paged_attention_quant_fp8_static": (x.view(5, 4, 64), rand(10, 16, 2, 64, device=device),
                                             rand(10, 16, 2, 64, device=device), table, 20, 0.125, scale),
        "attention": (x.view(5, 4, 64), r.view(5, 4, 64)[:, :2], r.view(5, 4, 64)[:, 2:], 0.125),
        "attention_quant_fp8_static": (x.view(5, 4, 64), r.view(5, 4, 64)[:, :2], r.view(5, 4, 64)[:, 2:], 0.125,
                                       scale),
    }
    for scheme in QUANT_SCHEMES.values():
        extras = extras_for(scheme, 256, device)
        cases[rms_norm_quant_name(scheme, False)] = (x, w, EPS, *extras)
        cases[rms_norm_quant_name(scheme, True)] = (x, r, w, EPS, *extras)
    for scheme in ACT_QUANT_SCHEMES:
        cases[act_quant_name(scheme)] = (x, *extras_for(scheme, 128, device))
    return cases


def test_every_fake_kernel_agrees_with_its_reference(device):
    cases = all_ops_with_args(device)
    for name, args in cases.items():
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        # test_schema compares inputs before and after with arithmetic CPU torch lacks for FP8 inputs.
        utils = ("test_faketensor", "test_aot_dispatch_dynamic") if name == "scaled_mm" else None
        kwargs = {"test_utils": utils} if utils else {}
        torch.library.opcheck(getattr(ops, name).default, args, **kwargs)
    packets = {n for n in dir(ops) if isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)}
    # Collectives need a process group: the TP=2 tests (test_collective_passes, the smoke sweep) cover them.
    defined = {n for n in packets
               if "group_name" not in [a.name for a in getattr(ops, n).default._schema.arguments]}
    assert defined <= set(cases), f"ops without an opcheck case: {defined - set(cases)}"
