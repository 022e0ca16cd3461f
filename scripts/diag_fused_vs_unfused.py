"""Do the fused and unfused GPU paths give the same bits? (python3 scripts/diag_fused_vs_unfused.py on a GPU)

Compares, on the same random inputs: each fused row op against its unfused chain of our Triton kernels (codes,
residual); and the FP8 GEMM against itself with its inputs in other (equal-valued) buffers, to see whether
cuBLASLt's choice depends on the buffers. Prints how many elements differ.
"""

import torch

import fusiontune.kernels  # noqa: F401

ops = torch.ops.fusiontune
torch.manual_seed(0)
for tokens in (64, 512, 2048, 8192):
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).bfloat16()
    s = torch.tensor([0.01], device="cuda")
    r1, r2 = r.clone(), r.clone()
    fused = ops.fused_add_rms_norm_quant_fp8_static(x, r1, w, 1e-5, s)
    normed = ops.fused_add_rms_norm(x, r2, w, 1e-5)
    unfused = ops.quant_fp8_static(normed, s)
    plain_f = ops.rms_norm_quant_fp8_static(x, w, 1e-5, s)
    plain_u = ops.quant_fp8_static(ops.rms_norm(x, w, 1e-5), s)
    codes_differ = (fused.view(torch.uint8) != unfused.view(torch.uint8)).sum().item()
    plain_differ = (plain_f.view(torch.uint8) != plain_u.view(torch.uint8)).sum().item()
    # The same normalised values computed twice by the unfused kernel: is one kernel deterministic?
    again = ops.rms_norm(x, w, 1e-5)
    again2 = ops.rms_norm(x, w, 1e-5)
    wq = (torch.randn(14336, 4096, device="cuda") / 64).to(torch.float8_e4m3fn)
    ws = torch.rand(14336, device="cuda") + 0.5
    mm1 = ops.scaled_mm(fused, s, wq, ws, 0, torch.bfloat16)
    moved = torch.empty(fused.numel() + 16, dtype=torch.uint8, device="cuda")[16:].view(torch.float8_e4m3fn).view_as(fused)
    moved.copy_(fused)
    mm2 = ops.scaled_mm(moved, s, wq, ws, 0, torch.bfloat16)
    mm3 = ops.scaled_mm(fused.clone(), s, wq, ws, 0, torch.bfloat16)
    print(f"T={tokens}: add+norm->static fused vs unfused codes differ {codes_differ}, residual equal "
          f"{torch.equal(r1, r2)}; norm->static differ {plain_differ}; rms_norm twice equal {torch.equal(again, again2)}; "
          f"scaled_mm same inputs other buffer: differ {(mm1 != mm2).sum().item()}, clone: differ {(mm1 != mm3).sum().item()}")
