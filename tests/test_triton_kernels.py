"""The Triton row kernel behind every norm / activation / quant op, against the reference on fresh random data.

Outputs are poisoned (NaN, or the e4m3 NaN code) before each run so an unwritten element fails. FP8 codes must
equal the reference's except for differences this file names and counts:
- one code, from the last bit of rsqrt / sigmoid (a value near a rounding boundary lands on the other side);
  bounded by ONE_CODE_FRACTION. Measured on the H100 (scripts/diag_rounding.py, 4097 x 4096): with an fp32 sum of
  squares the normalised value differed from torch's in 0.0002% (bf16) / 0.0027% (fp16) of elements, by one ulp
  (at most 2 ulps after the weight multiply); with the fp64 sum both now use, none differ. The bounds below stay at
  2 ulps in 0.1% of elements for the rsqrt / sigmoid last bit;
- on CPU only, Triton's interpreter defect: its fp32 -> e4m3 cast drops the carry when rounding reaches the next
  power of two (7.89 -> 4.0, not 8.0), and its fp32 -> bf16 cast truncates. So on CPU the kernels run on fp32
  inputs (no bf16 rounding points) and exactly that defect is allowed; on the GPU every cast is checked.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from fusiontune.kernels import numerics  # noqa: E402
from fusiontune.kernels.triton_rows import (  # noqa: E402
    INPUT_ADD_RESIDUAL, INPUT_PLAIN, INPUT_SILU_MUL, reciprocal, run_rows,
)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
ROWS = [1, 7, 65, 4097] if ON_GPU else [1, 7, 65]
HIDDEN = [2880, 4096, 14336] if ON_GPU else [2880, 4096]
ONE_CODE_FRACTION = 0.005
FP8_NAN = 0x7F
EPS = 1e-6


def poisoned(shape, dtype):
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    if dtype == numerics.FP8_DTYPE:
        t.view(torch.uint8).fill_(FP8_NAN)
    else:
        t.fill_(float("nan"))
    return t


def classify_codes(got: torch.Tensor, want: torch.Tensor) -> dict[str, int]:
    """Count equal codes, one-code differences, the interpreter's dropped-carry defect, and anything else."""
    g, w = got.view(torch.uint8).int(), want.view(torch.uint8).int()
    differ = g != w
    same_sign = (g & 0x80) == (w & 0x80)
    one_code = differ & same_sign & ((g - w).abs() == 1)
    gv, wv = got.float(), want.float()
    power_of_two = (wv.abs() > 0) & (torch.log2(wv.abs()) == torch.log2(wv.abs()).round())
    dropped_carry = differ & power_of_two & (gv == wv / 2)
    return {"total": got.numel(), "differ": int(differ.sum()), "one_code": int(one_code.sum()),
            "dropped_carry": int(dropped_carry.sum()), "other": int((differ & ~one_code & ~dropped_carry).sum())}


def assert_codes(got, want):
    counts = classify_codes(got, want)
    assert torch.isfinite(got.float()).all(), "an output element was not written (poison left)"
    assert counts["other"] == 0, counts
    if ON_GPU:
        assert counts["dropped_carry"] == 0, counts
    assert counts["one_code"] <= ONE_CODE_FRACTION * counts["total"], counts
    return counts


ROUNDING_FRACTION = 1e-3  # of elements (or scales) that may differ, each by at most MAX_ULPS


def ulps_apart(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - want| relative to the larger magnitude, in units of ``dtype``'s eps. One ulp of a value is at most
    eps times its magnitude, so k ulps of the dtype is at most k here, also where got and want straddle a power of
    two, and for a scale derived from an amax of that dtype (amax / 448 shifts the binade, not the relative error)."""
    magnitude = torch.maximum(got.float().abs(), want.float().abs()).clamp(min=torch.finfo(dtype).tiny)
    return (got.float() - want.float()).abs() / (torch.finfo(dtype).eps * magnitude)


def assert_close_in_ulps(got, want, dtype, max_ulps=2):
    apart = ulps_apart(got, want, dtype)
    differ = int((apart > 0).sum())
    assert apart.max().item() <= max_ulps, f"max {apart.max().item():.2f} ulps"
    assert differ <= max(1, ROUNDING_FRACTION * got.numel()), f"{differ} of {got.numel()} differ"


def assert_values(got, want):
    assert torch.isfinite(got.float()).all(), "an output element was not written (poison left)"
    if got.dtype == torch.float32:  # fp32 sum order only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert_close_in_ulps(got, want, got.dtype)


def inputs(rows, hidden, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, device=DEVICE).to(dtype)
    residual = torch.randn(rows, hidden, generator=g, device=DEVICE).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g, device=DEVICE)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_norms(rows, hidden, dtype):
    x, residual, weight = inputs(rows, hidden, dtype, seed=rows * hidden)
    out = poisoned((rows, hidden), dtype)
    run_rows(x, weight=weight, eps=EPS, out=out)
    assert_values(out, numerics.rms_norm(x, weight, EPS))
    mine, ref = residual.clone(), residual.clone()
    out = poisoned((rows, hidden), dtype)
    run_rows(x, input_mode=INPUT_ADD_RESIDUAL, residual=mine, weight=weight, eps=EPS, out=out)
    ref.copy_(numerics.residual_add(x, ref))
    assert torch.equal(mine, ref), "residual written differently"
    assert_values(out, numerics.rms_norm(ref, weight, EPS))


SCHEMES = [("fp8-static", {}), ("fp8-per-token", {}), ("fp8-per-group", {"group_size": 64}),
           ("fp8-per-group", {"group_size": 128})]


def reference_quant(values, quant, scale, group_size):
    if quant == "fp8-static":
        return numerics.quant_fp8_static(values, scale), None
    if quant == "fp8-per-token":
        return numerics.quant_fp8_per_token(values)
    return numerics.quant_fp8_per_group(values, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("stage", ["quant", "norm", "add_norm", "silu"])
@pytest.mark.parametrize("quant, extra", SCHEMES, ids=lambda v: str(v) if isinstance(v, str) else str(v or ""))
def test_quantising_forms(rows, dtype, stage, quant, extra):
    check_quantising_form(rows, dtype, stage, quant, extra)


@pytest.mark.parametrize("stage", ["norm", "add_norm"])
@pytest.mark.parametrize("quant, extra", SCHEMES, ids=lambda v: str(v) if isinstance(v, str) else str(v or ""))
def test_quantising_forms_with_and_without_prefetch(stage, quant, extra):
    """Both load orders (weight and static scale first, for few rows; after the reduction, for many) on one size."""
    for prefetch in (True, False):
        check_quantising_form(7, DTYPES[0], stage, quant, extra, prefetch=prefetch)


def check_quantising_form(rows, dtype, stage, quant, extra, prefetch=None):
    hidden = 2880 if extra.get("group_size") != 128 else 4096
    if stage == "silu" and quant == "fp8-per-token":
        pytest.skip("silu_and_mul -> per-token quant has no fused op")
    x, residual, weight = inputs(rows, hidden, dtype, seed=rows + hidden)
    scale = torch.tensor([0.02], device=DEVICE)
    kwargs = {"quant": quant, "scale": scale, **extra}
    if stage == "silu":
        x = torch.cat([x, residual], dim=-1)
        values = numerics.silu_and_mul(x)
        kwargs["input_mode"] = INPUT_SILU_MUL
    elif stage == "quant":
        values = x
    elif stage == "norm":
        values = numerics.rms_norm(x, weight, EPS)
        kwargs.update(weight=weight, eps=EPS)
    else:
        ref_residual = residual.clone()
        ref_residual.copy_(numerics.residual_add(x, ref_residual))
        values = numerics.rms_norm(ref_residual, weight, EPS)
        kwargs.update(input_mode=INPUT_ADD_RESIDUAL, residual=residual, weight=weight, eps=EPS)
    want_codes, want_scales = reference_quant(values, quant, scale, extra.get("group_size", 0))
    out = poisoned((rows, hidden), numerics.FP8_DTYPE)
    scales_out = None
    if want_scales is not None:  # poisoned, in the layout the reference returns (token-major)
        scales_out = numerics.token_major_scales(poisoned(want_scales.shape, torch.float32))
    result = run_rows(x, out=out, scales_out=scales_out, prefetch=prefetch, **kwargs)
    assert_codes(out, want_codes)
    if want_scales is not None:
        assert result[1].shape == want_scales.shape and result[1].stride() == want_scales.stride()
        if ON_GPU:
            assert_close_in_ulps(scales_out, want_scales, dtype)
        else:
            torch.testing.assert_close(scales_out, want_scales, rtol=1e-6, atol=0)
    if stage == "add_norm":
        assert torch.equal(residual, ref_residual)


@pytest.mark.parametrize("prefetch", [True, False])
def test_norm_with_and_without_prefetch(prefetch):
    x, residual, weight = inputs(7, 2880, DTYPES[0], seed=11)
    out = poisoned((7, 2880), DTYPES[0])
    mine = residual.clone()
    run_rows(x, input_mode=INPUT_ADD_RESIDUAL, residual=mine, weight=weight, eps=EPS, out=out, prefetch=prefetch)
    total = numerics.residual_add(x, residual)
    assert torch.equal(mine, total)
    assert_values(out, numerics.rms_norm(total, weight, EPS))


@pytest.mark.parametrize("hidden, full_tiles", [(1024, True), (2880, False), (200, False)])
def test_silu_forms_with_full_tiles_and_masked(hidden, full_tiles):
    """SiLU * Mul, alone and into static FP8, where every tile is full (no masks: ``EVEN``) and where the last is
    not (1024 is two full tiles; 2880 leaves a part tile; 200 is one part tile)."""
    from fusiontune.kernels.triton_rows import row_shape_constants

    dtype = DTYPES[0]
    assert row_shape_constants(hidden, hidden, False, None, 0, 3, dtype)["EVEN"] is full_tiles
    x, up, _ = inputs(3, hidden, dtype, seed=hidden)
    gate_up = torch.cat([x, up], dim=-1)
    out = poisoned((3, hidden), dtype)
    run_rows(gate_up, input_mode=INPUT_SILU_MUL, out=out)
    assert_values(out, numerics.silu_and_mul(gate_up))
    scale = torch.tensor([0.02], device=DEVICE)
    codes = poisoned((3, hidden), numerics.FP8_DTYPE)
    run_rows(gate_up, input_mode=INPUT_SILU_MUL, quant="fp8-static", scale=scale, out=codes)
    assert_codes(codes, reference_quant(numerics.silu_and_mul(gate_up), "fp8-static", scale, 0)[0])


WALK_FORMS = {  # the whole-row forms _row_walk_kernel serves: (input mode, takes the weight, quant, group size)
    "norm": (INPUT_PLAIN, True, None, 0),
    "add+norm": (INPUT_ADD_RESIDUAL, True, None, 0),
    "norm->static": (INPUT_PLAIN, True, "fp8-static", 0),
    "add+norm->static": (INPUT_ADD_RESIDUAL, True, "fp8-static", 0),
    "norm->per-token": (INPUT_PLAIN, True, "fp8-per-token", 0),
    "norm->per-group": (INPUT_PLAIN, True, "fp8-per-group", 8),
    "per-token": (INPUT_PLAIN, False, "fp8-per-token", 0),
}


@pytest.mark.parametrize("form", list(WALK_FORMS))
@pytest.mark.parametrize("hidden", [2880, 4096] if ON_GPU else [200])
def test_row_walk_matches_one_program_per_row(monkeypatch, form, hidden):
    """A grid of a few programs walking rows (each loading the next row before finishing the current) writes the
    per-row kernel's outputs, residual and scales bit for bit, every row (poisoned outputs); odd row counts leave
    programs with one row fewer, and 200 columns a masked part of the block."""
    from fusiontune.kernels import triton_rows

    input_mode, norm, quant, group = WALK_FORMS[form]
    rows = 4097 if ON_GPU else 7
    monkeypatch.setattr(triton_rows, "ROW_WALK_MIN_ROWS", 1)
    dtype = DTYPES[0]
    x, residual, weight = inputs(rows, hidden, dtype, seed=hidden + rows)
    kwargs = {"input_mode": input_mode, "weight": weight if norm else None, "eps": EPS, "quant": quant,
              "scale": torch.tensor([0.02], device=DEVICE), "group_size": group}
    results = {}
    for per_sm in (0, 2):  # 0: one program per row; on CPU 2 programs walk the 7 rows
        monkeypatch.setattr(triton_rows, "ROW_WALK_PROGRAMS_PER_SM", per_sm)
        walkers = triton_rows.row_walk_programs(rows, hidden, hidden, input_mode, norm, quant, DEVICE)
        assert (walkers > 0) == (per_sm > 0) and walkers < rows
        out = poisoned((rows, hidden), numerics.FP8_DTYPE if quant else dtype)
        res = residual.clone() if input_mode == INPUT_ADD_RESIDUAL else None
        got = run_rows(x, residual=res, out=out, **kwargs)
        results[per_sm] = [t.view(torch.uint8) if t.dtype == numerics.FP8_DTYPE else t
                           for t in (got if isinstance(got, tuple) else (got,)) + ((res,) if res is not None else ())]
    for walked, per_row in zip(results[2], results[0]):
        assert torch.equal(walked, per_row)


@pytest.mark.parametrize("stage", ["add_norm", "silu"])
def test_rows_beyond_one_grid_launch(monkeypatch, stage):
    """More rows than one launch's grid holds (65535) go in several launches; 3 per launch here, 7 rows."""
    from fusiontune.kernels import triton_rows

    monkeypatch.setattr(triton_rows, "MAX_GRID_ROWS", 3)
    check_quantising_form(7, DTYPES[0], stage, "fp8-per-group", {"group_size": 64})
    check_quantising_form(7, DTYPES[0], stage, "fp8-static", {})


@pytest.mark.parametrize("rows", ROWS)
def test_add_norm_written_padded(rows):
    """fused_add_rms_norm_pad's kernel: gpt-oss's 2880 padded to 3072, zeros after column 2880."""
    from fusiontune.kernels.act_padding import _fused_add_rms_norm_pad

    dtype = DTYPES[0]
    x, residual, weight = inputs(rows, 2880, dtype, seed=rows)
    mine, ref = residual.clone(), residual.clone()
    out = poisoned((rows, 3072), dtype)
    run_rows(x, input_mode=INPUT_ADD_RESIDUAL, residual=mine, weight=weight, eps=EPS, out=out, pad_to=3072)
    want = _fused_add_rms_norm_pad(x, ref, weight, EPS, 3072)
    assert torch.equal(mine, ref)
    assert torch.equal(out[:, 2880:], torch.zeros_like(out[:, 2880:]))
    assert_values(out, want)


def test_default_scales_are_token_major():
    """The kernel's own scales buffer has the reference's layout: what the fake kernel promises the compiler."""
    x = inputs(5, 256, DTYPES[0], seed=2)[0]
    _, scales = run_rows(x, quant="fp8-per-group", group_size=64)
    _, want = numerics.quant_fp8_per_group(x, 64)
    assert scales.shape == (5, 4) and scales.stride() == want.stride() == (1, 5)


def test_ops_dispatch_to_triton_on_cuda():
    if not ON_GPU:
        pytest.skip("the CUDA dispatch needs a GPU")
    x, residual, weight = inputs(33, 4096, torch.bfloat16, seed=3)
    ops = torch.ops.fusiontune
    codes, scales = ops.fused_add_rms_norm_quant_fp8_per_group(x, residual.clone(), weight, EPS, 128)
    want = numerics.quant_fp8_per_group(numerics.rms_norm(numerics.residual_add(x, residual), weight, EPS), 128)
    assert_codes(codes, want[0])


@triton.jit
def _reciprocals(scales_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, reciprocal(tl.load(scales_ptr + offs, mask=mask, other=1.0)), mask=mask)


def reciprocal_mismatches(bits: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns among ``bits`` that the kernels' ``reciprocal`` inverts differently from torch's IEEE
    ``1 / x`` (bit for bit; NaN matches NaN)."""
    scales = bits.view(torch.float32)
    got = torch.empty_like(scales)
    _reciprocals[(triton.cdiv(scales.numel(), 1024),)](scales, got, scales.numel(), BLOCK=1024)
    want = 1.0 / scales
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    return bits[~same].cpu()


def test_reciprocal_is_ieee_for_every_fp32_scale():
    """Quantisation multiplies by ``reciprocal(scale)``, which must be IEEE's 1 / scale for the codes to be the
    reference's. On the GPU every fp32 bit pattern is checked, in chunks: zeros, subnormals, normals, infinities and
    NaNs of both signs. The interpreter's division is already IEEE's, so on CPU a strided sample checks only the
    formula. A failure names the first patterns that differ (2026-12-07, H100: a branch-free Newton-step candidate
    differed in 10 of the 2^32, and was dropped)."""
    first, last, step = (0, 0x7FFFFFFF, 1) if ON_GPU else (0, 0x7FFFFFFF, 32749)
    chunk = 1 << 27
    mismatches = []
    for start in range(first, last + 1, chunk * step):
        stop = min(start + chunk * step, last + 1)
        bits = torch.arange(start, stop, step, dtype=torch.int64, device=DEVICE).to(torch.int32)
        mismatches += [reciprocal_mismatches(bits), reciprocal_mismatches(bits | torch.iinfo(torch.int32).min)]
    differ = torch.cat(mismatches)
    shown = ", ".join(f"{b & 0xFFFFFFFF:#010x}" for b in differ[:8].tolist())
    assert differ.numel() == 0, f"{differ.numel()} patterns differ, first: {shown}"
