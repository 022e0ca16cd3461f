"""Can this torch run the FP8 GEMM that follows a per-group quant on this GPU, and what does it read?

Tries ``torch._scaled_mm`` with 1x128 activation scales (token-major, as ``numerics.token_major_scales`` lays them
out) and 128x128 weight block scales, checks it against the fp32 dequantised product, and times it beside the
row-wise FP8 GEMM and bf16 at Llama-8B shapes (python3 scripts/probe_blockwise_mm.py, on the GPU).
"""

import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import numerics

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("torch.nn.functional.scaled_mm:", hasattr(torch.nn.functional, "scaled_mm"))
for m, k, n in ((16, 4096, 6144), (4096, 4096, 6144), (4096, 14336, 4096)):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device="cuda") / k**0.5
    a, a_scale = numerics.quant_fp8_per_group(x, 128)
    blocks = w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3)) / numerics.FP8_MAX
    b = (w / blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(numerics.FP8_DTYPE)
    want = numerics.dequantize(a, a_scale, 128) @ (b.float() * blocks.repeat_interleave(128, 0)
                                                    .repeat_interleave(128, 1)).t()
    line = f"M={m} K={k} N={n}: a_scale {tuple(a_scale.shape)} strides {a_scale.stride()}; "
    try:
        got = torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=blocks.t(), out_dtype=torch.bfloat16)
        rel = ((got.float() - want).abs().max() / want.abs().max()).item()
        us = statistics.median(time_per_call(lambda _: torch._scaled_mm(
            a, b.t(), scale_a=a_scale, scale_b=blocks.t(), out_dtype=torch.bfloat16), [{}] * 8))
        line += f"blockwise ok, max rel err {rel:.2e}, {us:.1f} us"
    except Exception as exc:  # noqa: BLE001 - a probe reports whatever torch says
        line += f"blockwise FAILED: {type(exc).__name__}: {str(exc)[:300]}"
    row_scale = torch.ones(m, 1, device="cuda")
    col_scale = torch.ones(1, n, device="cuda")
    us_row = statistics.median(time_per_call(lambda _: torch._scaled_mm(
        a, b.t(), scale_a=row_scale, scale_b=col_scale, out_dtype=torch.bfloat16), [{}] * 8))
    wb = w.to(torch.bfloat16)
    us_bf16 = statistics.median(time_per_call(lambda _: x @ wb.t(), [{}] * 8))
    us_ref = statistics.median(time_per_call(lambda _: numerics.dequantize(a, a_scale, 128) @ w.t(), [{}] * 4))
    print(line + f" | rowwise {us_row:.1f} us | bf16 {us_bf16:.1f} us | fp32 dequantised reference {us_ref:.1f} us")
