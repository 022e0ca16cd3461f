"""How a whole-row program of the row kernel should be launched, timed on the GPU: the norm forms (and SiLU) at each
hidden size with 4, 8, 16 and 32 warps, without column masks (``--unmasked``), and in the row loop (``--loop K``:
``run_rows(loop_programs=K x SMs)``, a fixed grid of programs, each loading its next row while it reduces and
stores the current one), with each column's registers and spills per thread as the GPU's Triton compiled them:

    python3 scripts/probe_row_warps.py [--hidden 4096 8192] [--tokens 4096 16384] [--warps 4 8]
                                       [--forms norm add+norm norm->static ...] [--unmasked]
                                       [--loop 2 4 8 [--loop-warps 4 8]]

A cap on registers (the compiler's ``maxnreg``) was timed here on an H100 on 2026-12-07 and removed: Triton 3.6
gives these kernels 32-59 registers (Triton 3.9 on the CPU machine had shown 70-79), and capped they were no
faster, up to 7% slower.
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
    parser.add_argument("--loop", type=int, nargs="*", default=[],
                        help="programs per SM to time in the row loop (run_rows' loop_programs = this x SMs)")
    parser.add_argument("--unmasked", action="store_true",
                        help="also time the kernel without column masks (run_rows(unmasked=True))")
    parser.add_argument("--loop-warps", type=int, nargs="*", default=[],
                        help="warps of the row loop's programs (default: the heuristic's)")
    args = parser.parse_args()
    default = triton_rows._warps
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    loops = [(k, w) for k in args.loop for w in (args.loop_warps or [None])]
    columns = ([f"{w}w" for w in args.warps]
               + (["unmasked"] if args.unmasked else [])
               + [f"loop{k}x{'/' + str(w) + 'w' if w else ''}" for k, w in loops])
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
                    block = triton_rows.triton.next_power_of_2(hidden)
                    chosen = default(min(block, triton_rows.ELEMENTWISE_TILE) if form.startswith("silu") else block)
                    cells, registers = [], []
                    for warps in args.warps:
                        triton_rows._warps = lambda block, w=warps: w
                        us = statistics.median(time_per_call(run, sets))
                        cells.append(f"{us:>9.2f}{'*' if warps == chosen else ' '}")
                        registers.append(registers_of_new(seen))
                    triton_rows._warps = default
                    if args.unmasked:
                        us = statistics.median(time_per_call(lambda i: run(i, unmasked=True), sets))
                        cells.append(f"{us:>9.2f} ")
                        registers.append(registers_of_new(seen))
                    for per_sm, warps in loops:
                        if form.startswith("silu"):  # no row loop for the elementwise forms
                            cells.append(f"{'-':>9} ")
                            continue
                        triton_rows._warps = (lambda block, w=warps: w) if warps else default
                        us = statistics.median(time_per_call(
                            lambda i, n=per_sm * sms: run(i, loop_programs=n), sets))
                        cells.append(f"{us:>9.2f} ")
                        registers.append(registers_of_new(seen))
                    triton_rows._warps = default
                    print(f"{form:<20} {hidden:>6} {tokens:>6} " + " ".join(cells) + "   " + " ".join(registers),
                          flush=True)
    finally:
        triton_rows._warps = default


if __name__ == "__main__":
    main()
