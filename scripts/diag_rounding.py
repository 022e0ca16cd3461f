"""Where the Triton row kernel and torch differ on the GPU, and by how much (in units of the output's last place).

Run on a GPU: python3 scripts/diag_rounding.py. Prints, per dtype: how many norm outputs differ, the largest
difference in ulps, whether the normalised value (before the weight) already differs, and for per-group quant how
many group scales differ and by how many ulps of the input dtype; then the copy bandwidth both ways.
"""

import torch

from fusiontune.harness.bench_kernels import copy_bandwidth_gbs
from fusiontune.kernels import numerics
from fusiontune.kernels.triton_rows import run_rows


def ulps(got, want):
    spacing = torch.finfo(want.dtype).eps * torch.pow(2.0, torch.floor(torch.log2(want.float().abs().clamp(min=1e-30))))
    return ((got.float() - want.float()).abs() / spacing).max().item()


for dtype in (torch.bfloat16, torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4097, 4096, generator=g, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(4096, generator=g, device="cuda")).to(dtype)
    ones = torch.ones_like(w)
    got, want = run_rows(x, weight=w, eps=1e-6), numerics.rms_norm(x, w, 1e-6)
    got1, want1 = run_rows(x, weight=ones, eps=1e-6), numerics.rms_norm(x, ones, 1e-6)
    xf = x.float()
    var_torch = xf.pow(2).mean(-1)
    var_fp64 = x.double().pow(2).mean(-1)
    print(f"{dtype}: norm outputs differ {(got != want).float().mean().item():.4%}, max {ulps(got, want):.2f} ulp; "
          f"normalised value (weight 1) differs {(got1 != want1).float().mean().item():.4%}, max {ulps(got1, want1):.2f} ulp; "
          f"torch fp32 variance vs fp64: max rel {((var_torch - var_fp64) / var_fp64).abs().max().item():.2e}")
    codes, scales = run_rows(x, weight=w, eps=1e-6, quant="fp8-per-group", group_size=128)
    wcodes, wscales = numerics.quant_fp8_per_group(want, 128)
    differ = scales != wscales
    rel = ((scales - wscales).abs() / wscales).max().item()
    print(f"  per-group-128 scales differ {differ.float().mean().item():.4%} (max rel {rel:.2e} = "
          f"{rel / torch.finfo(dtype).eps:.2f} ulp of {dtype}); codes differ {(codes.view(torch.uint8) != wcodes.view(torch.uint8)).float().mean().item():.4%}")
    # Against fp64 truth: which side is closer?
    truth = (x.double() / torch.sqrt(var_fp64[:, None] + 1e-6))
    print(f"  normalised value vs fp64: triton max err {(got1.double() - truth).abs().max().item():.3e}, "
          f"torch {(want1.double() - truth).abs().max().item():.3e}")

best, ways = copy_bandwidth_gbs()
print(f"copy ceiling {best:.0f} GB/s, the best of: " + ", ".join(f"{way} {gbs:.0f}" for way, gbs in ways.items()))
