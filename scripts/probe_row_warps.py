"""How many warps a whole-row program should have, and whether a cap on its registers pays: times the quantising
norms at each hidden size with 4, 8, 16 and 32 warps, then (``--registers``) at the heuristic's warps with the
registers per thread capped (the compiler's ``maxnreg``), a diagnostic for the GPU:

    python3 scripts/probe_row_warps.py [--registers 56 64 72] [--hidden 4096 8192] [--tokens 4096 16384]

Why the cap: compiled for sm_90, ``rms_norm -> static FP8`` takes 79 registers per thread at 8 warps and H=4096
where ``rms_norm`` takes 48, which fits 3 programs of 256 threads on an SM instead of 5 (Triton 3.9 here; capped
at 56 or 64 it spills nothing). The quantising norms are the rows under 90% of copy at 4096 tokens (issue 22).
"""

import argparse
import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import triton_rows

FORMS = {
    "norm->static": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-static",
                                                          scale=i["s"], **kw),
    "norm->per-token": lambda i, **kw: triton_rows.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-per-token",
                                                             **kw),
    "add+norm->per-token": lambda i, **kw: triton_rows.run_rows(i["x"], input_mode=triton_rows.INPUT_ADD_RESIDUAL,
                                                                 residual=i["r"], weight=i["w"], eps=1e-6,
                                                                 quant="fp8-per-token", **kw),
}
WARPS = (4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registers", type=int, nargs="*", default=[], help="register caps to time")
    parser.add_argument("--hidden", type=int, nargs="+", default=[2880, 4096, 8192, 14336])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    args = parser.parse_args()
    default = triton_rows._warps
    columns = [f"{w}w" for w in WARPS] + [f"<={r} regs" for r in args.registers]
    print(f"{'form':<20} {'hidden':>6} {'tokens':>6} " + " ".join(f"{c:>10}" for c in columns)
          + "   (us, median of 30 graph replays; the heuristic's warps marked *, the caps at its warps)")
    try:
        for form, run in FORMS.items():
            for hidden in args.hidden:
                for tokens in args.tokens:
                    sets = [{"x": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                             "r": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                             "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                             "s": torch.tensor([0.02], device="cuda")} for _ in range(8)]
                    chosen = default(triton_rows.triton.next_power_of_2(hidden))
                    cells = []
                    for warps in WARPS:
                        triton_rows._warps = lambda block, w=warps: w
                        us = statistics.median(time_per_call(run, sets))
                        cells.append(f"{us:>9.2f}{'*' if warps == chosen else ' '}")
                    triton_rows._warps = default
                    for cap in args.registers:
                        us = statistics.median(time_per_call(lambda i, c=cap: run(i, max_registers=c), sets))
                        cells.append(f"{us:>9.2f} ")
                    print(f"{form:<20} {hidden:>6} {tokens:>6} " + " ".join(cells), flush=True)
    finally:
        triton_rows._warps = default


if __name__ == "__main__":
    main()
