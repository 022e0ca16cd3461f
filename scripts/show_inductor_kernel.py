"""Print the Triton kernels Inductor generates for bench-kernels cases at static shapes, with the launch
configuration it chose: where Inductor's code beats ours, this shows what it does differently (a GPU diagnostic:
python3 scripts/show_inductor_kernel.py OP HIDDEN TOKENS [OP HIDDEN TOKENS ...], e.g. fused_add_rms_norm 8192 512)."""

import sys

import torch
from torch._inductor.utils import run_and_get_code

from fusiontune.harness import bench_kernels as bench

END_OF_SOURCE = "''', device_str='cuda')"


def show(name: str, hidden: int, tokens: int) -> None:
    case = next(c for c in bench.cases() if c.name == name)
    inputs = case.make_inputs(tokens, hidden, torch.bfloat16, seed=0)
    torch._dynamo.reset()
    compiled = torch.compile(case.expression, mode="max-autotune-no-cudagraphs", dynamic=False)
    _, codes = run_and_get_code(compiled, inputs)  # a case's expression takes its input dict
    print(f"===== {name} H={hidden} T={tokens}: Inductor's kernels =====")
    for code in codes:
        print(kernels_and_launches(code))


def kernels_and_launches(code: str) -> str:
    """The Triton sources of Inductor's output code and the lines that launch them."""
    keep, inside = [], False
    for line in code.splitlines():
        if line.startswith("@triton_heuristics") or line.startswith("@triton.jit"):
            inside = True
        if inside:
            keep.append(line)
        if inside and line.strip() == END_OF_SOURCE:
            inside = False
        if "grid=" in line or ".run(" in line:
            keep.append("LAUNCH: " + line.strip())
    return "\n".join(keep)


if __name__ == "__main__":
    args = sys.argv[1:]
    for at in range(0, len(args), 3):
        show(args[at], int(args[at + 1]), int(args[at + 2]))
