"""How many warps a program of the row kernel should have, timed on the GPU: the norm forms (and SiLU) at each
hidden size with 4, 8, 16 and 32 warps, with each column's registers and spills per thread as the GPU's Triton
compiled them:

    python3 scripts/probe_row_warps.py [--hidden 4096 8192] [--tokens 4096 16384] [--warps 4 8]
                                       [--forms norm add+norm norm->static ...]

Tried here and removed, none a clear win (docs/benchmarks.md, seventeenth and eighteenth sessions):
- a cap on registers (the compiler's ``maxnreg``; H100: up to 7% slower);
- a persistent row loop: a fixed grid of 2-8 programs per SM, each loading its next row while it reduced and stored
  the current one (H200: the best of six loop settings was slower than the best plain launch in 44 of 48 cases, by a
  median 6% and up to 22%, and 0.2-3% faster in four);
- the kernel without column masks where the block divides the row (H200: 0.97-1.03x the masked kernel's time for
  SiLU, 0.95-1.06x for the norms at H=4096).
"""

import argparse
import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import triton_rows

FORMS = {
    "norm": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, **kw),
    "add+norm": lambda i, **kw: triton_rows.run_rows(i["x"], input_mode=triton_rows.INPUT_ADD_RESIDUAL,
                                                      residual=i["r"], weight=i["w"], eps=1e-6, **kw),
    "norm->static": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-static",
                                                          scale=i["s"], **kw),
    "norm->per-token": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-per-token",
                                                             **kw),
    "norm->per-group": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-per-group",
                                                             group_size=128, **kw),
    "silu": lambda i, **kw: triton_rows.run_rows(i["xx"], input_mode=triton_rows.INPUT_SILU_MUL, **kw),
    "silu->static": lambda i, **kw: triton_rows.run_rows(i["xx"], input_mode=triton_rows.INPUT_SILU_MUL,
                                                          quant="fp8-static", scale=i["s"], **kw),
    "add+norm->per-token": lambda i, **kw: triton_rows.run_rows(i["x"], input_mode=triton_rows.INPUT_ADD_RESIDUAL,
                                                                 residual=i["r"], weight=i["w"], eps=1e-6,
                                                                 quant="fp8-per-token", **kw),
}
WARPS = (4, 8, 16, 32)


def compiled_row_kernels() -> list:
    """Every compiled specialisation of the row kernel so far (Triton keeps them per device)."""
    kernels = []
    for entry in getattr(triton_rows._row_kernel, "device_caches", {}).values():
        kernels.extend((entry[0] if isinstance(entry, tuple) else entry).values())
    return kernels


def registers_of_new(seen: set) -> str:
    """'registers/spilled' of the kernels compiled since ``seen`` (which is updated), as the GPU's compiler
    made them: Triton versions differ in what they allocate."""
    new = [k for k in compiled_row_kernels() if id(k) not in seen]
    seen.update(id(k) for k in new)
    counts = sorted({(getattr(k, "n_regs", None), getattr(k, "n_spills", None)) for k in new}, key=str)
    return ",".join(f"{r}/{s}" for r, s in counts) or "cached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2880, 4096, 8192, 14336])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--warps", type=int, nargs="+", default=list(WARPS), help="warps per program to time")
    args = parser.parse_args()
    default = triton_rows._warps
    columns = [f"{w}w" for w in args.warps]
    print(f"{'form':<20} {'hidden':>6} {'tokens':>6} " + " ".join(f"{c:>10}" for c in columns)
          + "   (us, median of 30 graph replays; the heuristic's warps marked *; then "
          "registers/spilled per thread of each column's kernel, as compiled here)")
    seen = set()
    try:
        for form in args.forms:
            run = FORMS[form]
            for hidden in args.hidden:
                for tokens in args.tokens:
                    sets = [{"x": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                             "r": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                             "xx": torch.randn(tokens, 2 * hidden, device="cuda", dtype=torch.bfloat16)
                             if form.startswith("silu") else None,
                             "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                             "s": torch.tensor([0.02], device="cuda")} for _ in range(8)]
                    blocks, times, registers = [], [], []  # blocks: what run_rows asked warps for
                    for warps in args.warps:
                        triton_rows._warps = lambda block, w=warps: blocks.append(block) or w
                        times.append(statistics.median(time_per_call(run, sets)))
                        registers.append(registers_of_new(seen))
                    triton_rows._warps = default
                    chosen = default(blocks[-1])
                    cells = [f"{us:>9.2f}{'*' if warps == chosen else ' '}" for us, warps in zip(times, args.warps)]
                    print(f"{form:<20} {hidden:>6} {tokens:>6} " + " ".join(cells) + "   " + " ".join(registers),
                          flush=True)
    finally:
        triton_rows._warps = default


if __name__ == "__main__":
    main()
