"""How many warps a whole-row program should have: times rms_norm -> fp8-static and add + rms_norm -> fp8-per-token
at each hidden size with 4, 8, 16 and 32 warps (a diagnostic for the GPU: python3 scripts/probe_row_warps.py)."""

import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import triton_rows

default = triton_rows._warps
print(f"{'form':<22} {'hidden':>6} {'tokens':>6} " + " ".join(f"{w:>8}w" for w in (4, 8, 16, 32))
      + "   (us, median of 30 graph replays; heuristic's choice marked *)")
for form in ("norm->static", "add+norm->per-token"):
    for hidden in (2880, 4096, 8192, 14336):
        for tokens in (1, 64, 4096):
            sets = [{"x": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                     "r": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                     "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16)} for _ in range(8)]
            scale = torch.tensor([0.02], device="cuda")
            cells = []
            for warps in (4, 8, 16, 32):
                triton_rows._warps = lambda block, w=warps: w
                if form == "norm->static":
                    fn = lambda i: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-static", scale=scale)
                else:
                    fn = lambda i: triton_rows.run_rows(i["x"], input_mode=triton_rows.INPUT_ADD_RESIDUAL,
                                                        residual=i["r"], weight=i["w"], eps=1e-6, quant="fp8-per-token")
                us = statistics.median(time_per_call(fn, sets))
                chosen = default(triton_rows.triton.next_power_of_2(hidden)) == warps
                cells.append(f"{us:>8.2f}{'*' if chosen else ' '}")
            print(f"{form:<22} {hidden:>6} {tokens:>6} " + " ".join(cells))
triton_rows._warps = default
