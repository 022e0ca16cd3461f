"""One Triton kernel for every row-wise op: (residual add | SiLU*Mul) -> [RMSNorm] -> [FP8 quant, any scheme].

Every op of kernels/ except the GEMM and the collective reads a token's row, transforms it, and writes it once,
so one kernel specialised by constexpr flags serves all of them: the unfused building blocks and the fused forms
are the same code with different stages switched on, which keeps their numerics identical to each other and to
``numerics.py``. One program handles one row, whole in registers (hidden sizes up to 32768): one read of each
input, one write of each output, nothing in between, which is what makes the fused forms worth having. (Where
enabled, ``_row_walk_kernel`` gives a program several rows in turn instead, with the same per-row code.)

Rounding points follow ``numerics.py``: squares added in fixed pairs within groups of 8, the groups in fp64, the
mean (times the width's fp64 reciprocal) rounded to fp32 once (so it does not depend on the reduction order, which
differs between specialisations), residual sum and normalised value rounded to
the input dtype, product with the weight rounded once, SiLU rounded before the multiply, quantisation by
multiplying with the scale's reciprocal (one IEEE division per scale, ``div_rn``: Triton's default fp32 ``/`` is
approximate) and round-to-nearest-even to e4m3. What can still differ from torch is the last bit of rsqrt / sigmoid,
which can move a value across a rounding boundary: tests count those differences.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .numerics import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, squares_paired
from .quant import QUANT_SCHEMES

INPUT_PLAIN, INPUT_ADD_RESIDUAL, INPUT_SILU_MUL = 0, 1, 2
QUANT_CODES = {None: 0, "fp8-static": 1, "fp8-per-token": 2, "fp8-per-group": 3}


@triton.jit
def reciprocal(scale):
    """IEEE 1 / scale (Triton's fp32 ``/`` is approximate), once per scale: elements then only multiply."""
    return tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)


@triton.jit
def fp8_codes(values, inv_scale, FP8_MAX_C: tl.constexpr):
    """FP8 e4m3 codes of fp32 ``values`` as ``numerics`` defines them: times the reciprocal scale, clamped to
    +-448, rounded to nearest even. Every Triton kernel that writes FP8 quantises here."""
    return tl.clamp(values * inv_scale, -FP8_MAX_C, FP8_MAX_C).to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def rms_normalized(v, inv_width, eps, PAIRED: tl.constexpr):
    """A row's values over their root mean square, in the row's dtype (before the weight multiply), as
    ``numerics.rms_norm`` forms it: the result does not depend on the summation order, which Triton derives from
    each specialisation's layout. ``inv_width``: 1 / the row's width in fp64 (``inverse_width_bits``). Masked
    columns must be zeros."""
    return normalized_by(v, sum_of_squares(v, PAIRED), inv_width, eps)


def inverse_width_bits(width: int) -> int:
    """The bits of 1 / width in fp64, as an int64 kernel argument that a kernel bitcasts back: it then has no fp64
    division of its own (measured on an H200: one at the kernel's start cost add + norm up to 0.5 us at 64 tokens).
    The same IEEE value as ``numerics``' ``1.0 / width``."""
    return struct.unpack("<q", struct.pack("<d", 1.0 / width))[0]


@triton.jit
def _pairs_added(s):
    """[N] -> [N / 2]: elements 2i and 2i + 1 added (one IEEE addition, the same whichever thread holds which)."""
    return tl.sum(tl.reshape(s, (s.shape[0] // 2, 2)), axis=1)


@triton.jit
def sum_of_squares(v, PAIRED: tl.constexpr):
    """A row's (or an aligned row part's) sum of squares in fp64, as ``numerics.sum_of_squares`` forms it: with
    ``PAIRED`` (``numerics.squares_paired``), the fp32 squares added pairwise within groups of 8, then the groups in
    fp64; else every square in fp64. Masked columns must be zeros."""
    if PAIRED:
        vf = v.to(tl.float32)
        groups = _pairs_added(_pairs_added(_pairs_added(vf * vf)))  # numerics.SQUARE_GROUP = 8
        total = tl.sum(groups.to(tl.float64), axis=0)
    else:
        vd = v.to(tl.float64)
        total = tl.sum(vd * vd, axis=0)
    return total


@triton.jit
def normalized_by(v, squares, inv_width, eps):
    """``rms_normalized`` given the row's fp64 sum of squares (a kernel that splits a row over several programs
    adds their parts)."""
    variance = (squares * inv_width).to(tl.float32)
    return (v.to(tl.float32) * tl.rsqrt(variance + eps)).to(v.dtype)


@triton.jit
def _finish_row(
    v, w, scale, row, tile, offs, mask, w_ptr, out_ptr, out_stride, scale_ptr,
    scales_ptr, scales_row_stride, scales_group_stride, H, OUT_W, eps, inv_width_bits,
    NORM: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, PAIRED: tl.constexpr,
    FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr, EVEN: tl.constexpr,
):
    """A row's (or tile's) input values ``v`` -> [RMSNorm x weight] -> [FP8 codes and scales] -> stored. ``w`` and
    ``scale`` are the weight and static scale when loaded early, else None (loaded here, after the reduction)."""
    dtype = v.dtype
    if NORM:
        normed = rms_normalized(v, inv_width_bits.to(tl.float64, bitcast=True), eps, PAIRED)
        if w is None:  # holding the weight through the reduction costs occupancy at many rows (up to 20%)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        v = (normed.to(tl.float32) * w.to(tl.float32)).to(dtype)
    out_row = out_ptr + row * out_stride
    if QUANT == 0:  # OUT_W >= H: columns past H are written as zeros (v is 0 there), the padded form
        tl.store(out_row + offs, v, mask=mask if EVEN else offs < OUT_W)
    elif QUANT == 1 or QUANT == 2:
        vf = v.to(tl.float32)
        if QUANT == 1:
            if scale is None:
                scale = tl.load(scale_ptr)
        else:
            amax = tl.max(tl.where(mask, tl.abs(vf), 0.0), axis=0)
            scale = tl.maximum(amax / FP8_MAX_C, MIN_SCALE)
            tl.store(scales_ptr + row * scales_row_stride, scale)
        tl.store(out_row + offs, fp8_codes(vf, reciprocal(scale), FP8_MAX_C), mask=mask)
    else:  # per token-group of GROUP: one scale per group, stored where the scales tensor's strides say
        NUM_GROUPS: tl.constexpr = BLOCK // GROUP
        vg = tl.reshape(v.to(tl.float32), (NUM_GROUPS, GROUP))
        gmask = tl.reshape(mask, (NUM_GROUPS, GROUP))
        amax = tl.max(tl.where(gmask, tl.abs(vg), 0.0), axis=1)
        scales = tl.maximum(amax / FP8_MAX_C, MIN_SCALE)
        groups = tile * NUM_GROUPS + tl.arange(0, NUM_GROUPS)
        scales_at = scales_ptr + row * scales_row_stride + groups * scales_group_stride
        tl.store(scales_at, scales, mask=groups < H // GROUP)
        q = tl.reshape(fp8_codes(vg, reciprocal(scales)[:, None], FP8_MAX_C), (BLOCK,))
        tl.store(out_row + offs, q, mask=mask)


@triton.jit
def _row_kernel(
    x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, scale_ptr,
    scales_ptr, scales_row_stride, scales_group_stride,
    H, OUT_W, eps, inv_width_bits,
    INPUT: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr, PAIRED: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Program (tile, row) on grid axes (0, 1): tiles are the fastest axis, so programs running at once read
    # adjacent memory (row-fastest was 2-4% slower for SiLU at large num_tokens, H100). A tile is the whole row
    # when a stage reduces over it (norm, per-token scale), else BLOCK columns (a multiple of GROUP), so
    # elementwise forms spread one token over many programs.
    tile = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    if EVEN:  # every tile full and no padding: a constant mask, which the compiler drops (as Inductor's code has)
        mask = tl.full([BLOCK], True, tl.int1)
    else:
        mask = offs < H
    x_row = x_ptr + row * x_stride
    w = None
    scale = None
    if PREFETCH:  # few rows: the time is a chain of DRAM round trips, so ask for the weight and scale up front
        if NORM:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        if QUANT == 1:
            scale = tl.load(scale_ptr)
    if INPUT == 2:  # SiLU(gate) * up, gate = x[:H], up = x[H:2H]
        gate = tl.load(x_row + offs, mask=mask, other=0.0)
        up = tl.load(x_row + H + offs, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g * tl.sigmoid(g)).to(gate.dtype)
        v = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    else:
        v = tl.load(x_row + offs, mask=mask, other=0.0)
        if INPUT == 1:  # residual <- x + residual, then work on the sum
            r = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(res_ptr + row * res_stride + offs, v, mask=mask)
    _finish_row(v, w, scale, row, tile, offs, mask, w_ptr, out_ptr, out_stride, scale_ptr, scales_ptr,
                scales_row_stride, scales_group_stride, H, OUT_W, eps, inv_width_bits,
                NORM, QUANT, GROUP, BLOCK, PAIRED, FP8_MAX_C, MIN_SCALE, EVEN)


@triton.jit
def _row_walk_kernel(
    x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, scale_ptr,
    scales_ptr, scales_row_stride, scales_group_stride,
    H, eps, inv_width_bits, num_rows,
    INPUT: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
    PAIRED: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
):
    # The whole-row forms (plain or residual input) at many rows, on a grid of a few programs per SM: a program
    # walks rows first, first + programs, ..., and loads the next row's inputs before reducing the current one, so
    # its loads overlap its reductions and stores (one program per row has nothing to overlap with its own chain).
    first = tl.program_id(0)
    step = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x_next = tl.load(x_ptr + first.to(tl.int64) * x_stride + offs, mask=mask, other=0.0)
    if INPUT == 1:
        r_next = tl.load(res_ptr + first.to(tl.int64) * res_stride + offs, mask=mask, other=0.0)
    for i in range(0, tl.cdiv(num_rows - first, step)):
        row = first.to(tl.int64) + i * step
        following = tl.minimum(row + step, num_rows - 1)  # past the end: the last row again, read and unused
        v = x_next
        x_next = tl.load(x_ptr + following * x_stride + offs, mask=mask, other=0.0)
        if INPUT == 1:  # residual <- x + residual (another program never touches this row)
            r = r_next
            r_next = tl.load(res_ptr + following * res_stride + offs, mask=mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(res_ptr + row * res_stride + offs, v, mask=mask)
        _finish_row(v, None, None, row, 0, offs, mask, w_ptr, out_ptr, out_stride, scale_ptr, scales_ptr,
                    scales_row_stride, scales_group_stride, H, H, eps, inv_width_bits,
                    NORM, QUANT, GROUP, BLOCK, PAIRED, FP8_MAX_C, MIN_SCALE, False)


# Columns per program when no stage needs the whole row (SiLU * Mul, alone or into FP8), on 4 warps. Timed on an
# H100 with scripts/compare_row_kernels.py (docs/benchmarks.md, twenty-first session). For SiLU and SiLU -> static,
# 512 against 1024 was up to 7% faster at 1-64 tokens and level from 4096; 256 was up to 0.01 us faster at one
# token and up to 5.5% slower at 4, and 256 or 128 up to 2.7x slower at 4096 tokens (programs too small). Into
# per-group FP8, 512 was 3-5% slower from 4096 tokens (and 3-6% faster at 64), so that form keeps 1024.
ELEMENTWISE_TILE = 512
PER_GROUP_TILE = 1024


def _warps(block: int) -> int:
    """Warps per program: 32 columns per thread (a block of 4096 on 4 warps, 8192 on 8), at least 4 and at most 16.
    Timed 2026-12-07 with scripts/probe_row_warps.py (docs/benchmarks.md, eighteenth session): on an H200, 4 warps
    instead of 8 at a block of 4096 were up to 10% faster at 1 token and 4-7% faster from 4096 tokens for the
    quantising norms, and 8 instead of 16 at 8192 were 4-13% faster for them from 4096 tokens; the plain and
    residual norms were level. On an H100 (sixteenth and seventeenth sessions) they were within 0.5% either way from
    4096 tokens and up to 10% faster at 64. Elementwise tiles (ELEMENTWISE_TILE) keep 4."""
    return min(16, max(4, block // 1024))


def needs_whole_row(norm: bool, quant: str | None) -> bool:
    """Whether a stage reduces over the row (the norm, a per-token scale), so one program holds all of it."""
    return norm or quant == "fp8-per-token"


def row_block(out_width: int, norm: bool, quant: str | None, group_size: int = 0) -> int:
    """Columns per program: the whole row (as a power of two) when a stage reduces over it (the norm, a per-token
    scale), else a tile (PER_GROUP_TILE into per-group FP8, ELEMENTWISE_TILE otherwise); at least one quant group
    and 16."""
    block = (triton.next_power_of_2(out_width) if needs_whole_row(norm, quant)
             else min(PER_GROUP_TILE if quant == "fp8-per-group" else ELEMENTWISE_TILE,
                      triton.next_power_of_2(out_width)))
    return max(block, group_size or 1, 16)


# Up to this many rows the loads of the weight and static scale are issued first (``PREFETCH``). Measured on the
# H100 (scripts/compare_row_kernels.py): 5-10% faster at num_tokens <= 64, up to 20% slower at 512 x 14336 and
# above, where the weight held through the reduction costs occupancy. One program per row either way: programs of
# 2-8 rows were slower at every measured shape (up to 4x at 8 rows).
PREFETCH_MAX_ROWS = 128
MAX_GRID_ROWS = 65535

# The whole-row forms (norms, per-token quant; plain or residual input) may run from ROW_WALK_MIN_ROWS rows on a
# grid of ROW_WALK_PROGRAMS_PER_SM programs per SM, each walking rows with the next row's loads in flight during the
# current row's reductions (``_row_walk_kernel``): the lead for the quantising norms at 4096 tokens and up, which
# reach 93-95% of a copy of their bytes (nineteenth session, H100). 0 turns it off (one program per row), the
# default until timed: ``scripts/compare_row_kernels.py kernels/triton_rows.py:ROW_WALK_PROGRAMS_PER_SM=8
# kernels/triton_rows.py`` (docs/benchmarks.md, twenty-second session). Its output is the per-row kernel's, bit
# for bit (tests/test_triton_kernels.py).
ROW_WALK_PROGRAMS_PER_SM = 0
ROW_WALK_MIN_ROWS = 2048


def row_walk_programs(num_rows: int, width: int, out_width: int, input_mode: int, norm: bool, quant: str | None,
                      device: torch.device) -> int:
    """Programs of ``_row_walk_kernel`` for a launch, or 0 where the per-row kernel runs: the walk off, too few
    rows, an elementwise form, or a padded output."""
    if (ROW_WALK_PROGRAMS_PER_SM <= 0 or num_rows < ROW_WALK_MIN_ROWS or out_width != width
            or input_mode == INPUT_SILU_MUL or not needs_whole_row(norm, quant)):
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return min(num_rows, sms * ROW_WALK_PROGRAMS_PER_SM)


def row_shape_constants(width: int, out_width: int, norm: bool, quant: str | None, group_size: int, num_rows: int,
                        dtype: torch.dtype) -> dict:
    """The row kernel's constexprs that follow from the shape (``run_rows`` passes them; scripts/show_row_sass.py
    compiles the same specialisation): the tile, prefetch by row count, the pairing of squares, and whether every
    tile is full (no masks). Only elementwise tiles drop their masks: on an H100 that made SiLU * Mul up to 2.4%
    faster at 1-4 tokens, and three quantising norms 2-3% slower at H=8192 and one token (twenty-first session)."""
    block = row_block(out_width, norm, quant, group_size)
    return {"BLOCK": block, "PREFETCH": num_rows <= PREFETCH_MAX_ROWS, "PAIRED": squares_paired(width, dtype),
            "EVEN": not needs_whole_row(norm, quant) and out_width == width and width % block == 0}


def run_rows(x: torch.Tensor, *, input_mode: int = INPUT_PLAIN, residual: torch.Tensor | None = None,
             weight: torch.Tensor | None = None, eps: float = 0.0, quant: str | None = None,
             scale: torch.Tensor | None = None, group_size: int = 0,
             out: torch.Tensor | None = None, scales_out: torch.Tensor | None = None,
             prefetch: bool | None = None, pad_to: int = 0):
    """Launch the row kernel; returns what the matching op returns (a tensor, or (codes, scales)).
    ``out`` (contiguous) and ``scales_out`` (any strides; the layout of ``quant.scales_like`` by default) are
    written instead of new buffers: tests poison them. ``prefetch`` overrides the choice by row count (tests).
    ``pad_to`` (> width, no quant) makes the output that wide, zeros after the row's own columns."""
    width = x.shape[-1] // 2 if input_mode == INPUT_SILU_MUL else x.shape[-1]
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    res_rows = None
    if residual is not None:
        res_rows = residual.view(-1, width) if residual.is_contiguous() else residual.reshape(-1, width).clone()
    out_dtype = FP8_DTYPE if quant else x.dtype
    out_width = max(pad_to, width)
    if pad_to and (quant or pad_to < width):
        raise ValueError(f"pad_to={pad_to} needs an unquantised output at least as wide as the row ({width})")
    if out is None:
        out = torch.empty((num_rows, out_width), dtype=out_dtype, device=x.device)
    out = out.view(num_rows, out_width)
    scheme = QUANT_SCHEMES[quant] if quant else None
    if scales_out is None and scheme is not None and scheme.returns_scale:
        scales_out = scheme.scales_like(x, group_size, width)
    scales = scales_out.view(num_rows, -1) if scales_out is not None else out  # out: an unused pointer
    shape = row_shape_constants(width, out_width, weight is not None, quant, group_size, num_rows, x.dtype)
    if prefetch is not None:
        shape["PREFETCH"] = prefetch
    block = shape["BLOCK"]
    tiles = triton.cdiv(out_width, block)

    def row_arguments(first: int, end: int) -> tuple:
        """Both kernels' leading arguments for rows [first, end): input, residual, weight, output, static scale and
        scales (an unused pointer where a stage is off)."""
        res = res_rows[first:end] if res_rows is not None else None
        return (rows[first:end], rows.stride(0),
                res if res is not None else rows, res.stride(0) if res is not None else 0,
                weight if weight is not None else rows, out[first:end], out.stride(0),
                scale if scale is not None else out, scales[first:end], scales.stride(0), scales.stride(1))

    stages = {"INPUT": input_mode, "NORM": weight is not None, "QUANT": QUANT_CODES[quant], "GROUP": group_size or 1,
              "FP8_MAX_C": FP8_MAX, "MIN_SCALE": FP8_MIN_SCALE}
    walkers = row_walk_programs(num_rows, width, out_width, input_mode, weight is not None, quant, x.device)
    if walkers:
        _row_walk_kernel[(walkers,)](*row_arguments(0, num_rows), width, eps, inverse_width_bits(width), num_rows,
                                     BLOCK=block, PAIRED=shape["PAIRED"], num_warps=_warps(block), **stages)
    else:
        for first in range(0, num_rows, MAX_GRID_ROWS):  # grid axis 1 holds at most 65535 programs
            end = min(first + MAX_GRID_ROWS, num_rows)
            _row_kernel[(tiles, end - first)](*row_arguments(first, end), width, out_width, eps,
                                              inverse_width_bits(width), num_warps=_warps(block), **stages, **shape)
    if residual is not None and not residual.is_contiguous():
        residual.copy_(res_rows.view_as(residual))
    out = out.view(*lead, out_width)
    if scheme is not None and scheme.returns_scale:
        return out, scales_out
    return out
