"""Print the Triton kernels Inductor generates for one bench-kernels case at one static shape, with the launch
configuration it chose: where Inductor's code beats ours, this shows what it does differently (a GPU diagnostic:
python3 scripts/show_inductor_kernel.py OP HIDDEN TOKENS, e.g. fused_add_rms_norm 8192 512)."""

import sys

import torch
from torch._inductor.utils import run_and_get_code

from fusiontune.harness import bench_kernels as bench

name, hidden, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
case = next(c for c in bench.cases() if c.name == name)
inputs = case.make_inputs(tokens, hidden, torch.bfloat16, seed=0)
compiled = torch.compile(case.expression, mode="max-autotune-no-cudagraphs", dynamic=False)
_, codes = run_and_get_code(compiled, inputs["x"], inputs["residual"], inputs["weight"], inputs["scale"])
for code in codes:
    lines = code.splitlines()
    keep, inside = [], False
    for line in lines:
        if line.startswith("@triton_heuristics") or line.startswith("@triton.jit"):
            inside = True
        if inside:
            keep.append(line)
        if inside and line.strip() == "''', device_str='cuda')":
            inside = False
        if "grid=" in line or ".run(" in line:
            keep.append("LAUNCH: " + line.strip())
    print(f"===== {name} H={hidden} T={tokens}: Inductor's kernels =====")
    print("\n".join(keep))
