"""The arithmetic every op shares, written once.

A fused op is only a fair comparison if it computes exactly what its unfused chain computes: the same scale, the
same rounding points, the same clamping. So every reference implementation (unfused and fused) is composed from
the functions below, and a GPU kernel is correct when it reproduces them.

Rounding points, chosen to match vLLM's kernels:
- RMSNorm takes the mean of squares (``sum_of_squares`` times the fp64 reciprocal of the width), rounded to fp32
  once, then works in fp32, rounds the normalised value to the input dtype, and multiplies by the weight in the
  input dtype (``(x * rsqrt(mean(x^2) + eps)).to(dtype) * weight``). An fp32 sum depends on its order, and a GPU
  kernel's order depends on how it was compiled: two specialisations of one kernel (norm alone, norm + quant)
  differed in about one FP8 code per million on the H100 (scripts/diag_fused_vs_unfused.py). So the order is fixed
  where it is cheap and made not to matter where it is not: the squares of a 16-bit row (exact in fp32) are added in
  fixed pairs, pairs of pairs and so on within aligned groups of ``SQUARE_GROUP`` (one IEEE addition of two values
  is the same in any order), and the groups' sums are added in fp64, where any order rounds to the same fp32 mean.
  Rows of other widths or dtypes sum every square in fp64. Adding the group in fp32 first is what makes the
  quantising norms fast: the fp64 conversions and sums were their bottleneck (up to 1.33x on an H200, see
  docs/benchmarks.md). Squares of bf16 values beyond 1.8e19 overflow fp32 (as in vLLM's fp32 sums); the kernels
  agree with this reference there too.
- Residual add rounds the sum to the input dtype before the norm reads it.
- An all-reduce sums the ranks' partials in fp32, in rank order, and rounds once to their dtype
  (``all_reduce_sum``): every rank then holds the same bits. That is what fusiontune's fused all-reduce kernel
  and vLLM's custom all-reduce compute; NCCL's ring sums in the input dtype in an order of its own, which the
  correctness tolerance covers.
- SiLU is computed in fp32 and rounded to the input dtype before the multiply.
- Rotary embedding is computed in fp32 (``x1 * cos - x2 * sin``: two rounded products, then the difference; a GPU
  kernel must not contract it into an FMA) and rounded to the input dtype once.
- FP8 quantisation multiplies by the reciprocal of the scale, as vLLM's kernels do ("inverted scale"): the
  reciprocal is one IEEE fp32 division per scale, each element one fp32 multiply, then clamp to +-448 and round to
  nearest even (``Tensor.to(float8_e4m3fn)``). A per-element IEEE division costs a GPU kernel twice the time at
  hidden 2880 (measured on the H100, 2026-11-24: docs/benchmarks.md); this form is as cheap as a multiply and still
  reproducible bit for bit. Dynamic scales are ``max(amax / 448, 1 / (448 * 512))`` in fp32.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Smallest dynamic scale: keeps an all-zero row from dividing by zero (vLLM uses the same floor).
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


# Squares of a row are added in fixed pairs within aligned groups of this many elements before the fp64 sum.
SQUARE_GROUP = 8


def squares_paired(width: int, dtype: torch.dtype) -> bool:
    """Whether a row of ``width`` elements of ``dtype`` adds its squares in fixed groups first: 16-bit rows whose
    width is a multiple of 2 * SQUARE_GROUP, so that a row's halves (a kernel that holds the two rotated halves of a
    head apart) are whole groups too."""
    return dtype in (torch.float16, torch.bfloat16) and width % (2 * SQUARE_GROUP) == 0


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] fp64 sums of each row's squares, as every RMSNorm kernel forms them (see the module's note)."""
    if not squares_paired(x.shape[-1], x.dtype):
        return x.double().pow(2).sum(dim=-1, keepdim=True)
    squares = x.float() * x.float()  # exact: a 16-bit float's square fits fp32's significand
    for _ in range(SQUARE_GROUP.bit_length() - 1):
        squares = squares[..., 0::2] + squares[..., 1::2]
    return squares.double().sum(dim=-1, keepdim=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = (sum_of_squares(x) * (1.0 / x.shape[-1])).float()
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def residual_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return (x.float() + residual.float()).to(x.dtype)


def all_reduce_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of every rank's partial tensor (a list in rank order), as fusiontune's all-reduce computes it."""
    total = parts[0].float()
    for part in parts[1:]:
        total = total + part.float()
    return total.to(parts[0].dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    gate = x[..., :d].float()
    return (gate * torch.sigmoid(gate)).to(x.dtype) * x[..., d:]


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantise with a scale that broadcasts against ``x`` (per tensor, per token or per group)."""
    inverse = 1.0 / scale.float()
    return (x.float() * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dynamic_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=FP8_MIN_SCALE)


def quant_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8_quantize(x, scale.float().reshape(()))


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = dynamic_scale(x.abs().amax(dim=-1, keepdim=True))
    return fp8_quantize(x, scale), scale


def quant_fp8_per_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales come back as [num_tokens, hidden // group_size], one per token and group, token-major in memory."""
    check_group_size(x.shape[-1], group_size)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = dynamic_scale(groups.abs().amax(dim=-1, keepdim=True))
    q = fp8_quantize(groups, scale).reshape(x.shape)
    return q, token_major_scales(scale.squeeze(-1))


def token_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """The same [..., groups] scales, stored group by group: consecutive tokens of one group are adjacent.

    That is the layout the FP8 GEMM after a per-group quant reads (cuBLASLt's 1x128 block scaling through
    ``torch._scaled_mm``, and DeepGEMM / CUTLASS block-scaled kernels: the "column-major scales" of vLLM's
    ``per_token_group_quant_fp8``): a GEMM tile of M tokens fetches each group's M scales as one contiguous run.
    Every implementation returns this layout, so the fake kernel, the reference and the GPU kernel agree."""
    return scales.movedim(-1, 0).contiguous().movedim(0, -1)


def check_group_size(hidden: int, group_size: int) -> None:
    if group_size <= 0 or hidden % group_size != 0:
        raise ValueError(
            f"per-group FP8 quantisation needs a hidden size divisible by the group size: "
            f"{hidden} is not a multiple of {group_size}"
        )


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """fp32 values of FP8 codes; ``scale`` is per tensor, per row [M, 1] or per group [M, K // group_size]."""
    values = q.float()
    if group_size is not None:
        return (values.reshape(*q.shape[:-1], -1, group_size) * scale.float().unsqueeze(-1)).reshape(q.shape)
    return values * scale.float()


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n (a padded width, row count or tiled size)."""
    return -(-n // multiple) * multiple


def weight_block_scales(w: torch.Tensor, block: int) -> torch.Tensor:
    """Scales of a [N, K] weight quantised in block x block tiles (the weights of a per-group FP8 model, as
    DeepSeek-V3-style checkpoints ship them): [ceil(N / block), ceil(K / block)], each tile's amax / 448."""
    n, k = w.shape
    padded = torch.zeros(round_up(n, block), round_up(k, block), dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float().abs()
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    return (tiles.amax(dim=(1, 3)) / FP8_MAX).clamp(min=FP8_MIN_SCALE)


def expand_block_scales(scales: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Per-element scales of a [N, K] tensor from its block x block tile scales."""
    return scales.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def dequantize_weight(b: torch.Tensor, scale: torch.Tensor, block: int = 0) -> torch.Tensor:
    """fp32 values of [N, K] weight codes: per-output-channel scales [N], or tile scales (2-D, ``block`` > 0)."""
    if scale.dim() == 2:
        return b.float() * expand_block_scales(scale.float(), tuple(b.shape), block)
    return b.float() * scale.float().reshape(-1, 1)


def rope_pairs(x: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves a rotary embedding rotates against each other: the first and second half of each head
    (neox style) or its even and odd elements (gptj style)."""
    half = x.shape[-1] // 2
    return (x[..., :half], x[..., half:]) if is_neox else (x[..., 0::2], x[..., 1::2])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotary embedding of [num_tokens, heads, head_dim] with cos / sin [num_tokens, head_dim // 2] (fp32)."""
    x1, x2 = rope_pairs(x.float(), is_neox)
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.cat([o1, o2], dim=-1) if is_neox else torch.stack([o1, o2], dim=-1).flatten(-2)
    return out.to(x.dtype)
