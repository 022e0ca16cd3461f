"""The row kernel's machine code for one form, compiled for a GPU that is not here (sm_90 by default), on CPU:

    python3 scripts/show_row_sass.py silu->static [--hidden 4096] [--rows 1] [--version COPY.py] [--all]
    python3 scripts/show_row_sass.py norm->per-token --walk     (the row-walk kernel: a program, several rows)

Triton compiles to PTX with its bundled LLVM and to SASS with its bundled ptxas, neither of which needs a GPU, so
a kernel variant's instruction order can be read before any device time is spent on timing it. By default only
the lines that set a one-token kernel's critical path are printed: global loads and stores, MUFU (exp, reciprocal,
rsqrt), barriers (a reduction's step across warps), branches and calls (``--all``: every instruction).
Example, 2026-12-07: ``div_rn`` in ``reciprocal`` compiled to a slow-path branch that ptxas placed before the
SiLU math, which then waited for the scale's load.
The launch matches ``run_rows``' for the form (block, warps, prefetch, paired squares); arguments are given the
16-byte alignment Triton's launcher finds on real tensors. Reads, never times: compare_row_kernels.py times.
"""

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled, never interpreted (the CPU tests set it for everything else)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default on the GPU machine

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from compare_row_kernels import load  # noqa: E402  (a copy of triton_rows.py as a module)
from fusiontune.kernels import numerics, triton_rows  # noqa: E402

# form: (INPUT, NORM, QUANT, GROUP); the row kernel's stages as run_rows sets them for the op
FORMS = {
    "norm": (triton_rows.INPUT_PLAIN, True, None, 1),
    "add+norm": (triton_rows.INPUT_ADD_RESIDUAL, True, None, 1),
    "norm->static": (triton_rows.INPUT_PLAIN, True, "fp8-static", 1),
    "norm->per-token": (triton_rows.INPUT_PLAIN, True, "fp8-per-token", 1),
    "norm->per-group": (triton_rows.INPUT_PLAIN, True, "fp8-per-group", 128),
    "silu": (triton_rows.INPUT_SILU_MUL, False, None, 1),
    "silu->static": (triton_rows.INPUT_SILU_MUL, False, "fp8-static", 1),
    "silu->per-group": (triton_rows.INPUT_SILU_MUL, False, "fp8-per-group", 128),
}
ARGUMENTS = [  # the row kernel's runtime arguments: (name, Triton type, 16-byte aligned on real tensors)
    ("x_ptr", "*bf16", True), ("x_stride", "i64", True), ("res_ptr", "*bf16", True), ("res_stride", "i64", True),
    ("w_ptr", "*bf16", True), ("out_ptr", "*bf16", True), ("out_stride", "i64", True), ("scale_ptr", "*fp32", True),
    ("scales_ptr", "*fp32", True), ("scales_row_stride", "i64", False), ("scales_group_stride", "i64", False),
    ("H", "i32", True), ("OUT_W", "i32", True), ("eps", "fp32", False), ("inv_width_bits", "i64", False),
]
# the row-walk kernel's (triton_rows._row_walk_kernel): no padded width; the row count instead
WALK_ARGUMENTS = [argument for argument in ARGUMENTS if argument[0] != "OUT_W"] + [("num_rows", "i32", False)]
CRITICAL = re.compile(r"\b(LDG|STG|MUFU|BRA|CALL|FCHK|EXIT|BAR)\b")


def sass(module, form: str, hidden: int, rows: int, arch: int, walk: bool = False) -> str:
    input_mode, norm, quant, group = FORMS[form]
    shape = module.row_shape_constants(hidden, hidden, norm, quant, group, rows, torch.bfloat16)
    block = shape["BLOCK"]
    if walk:  # the walk kernel takes the block and the pairing; it has no prefetch and keeps its masks
        shape = {"BLOCK": block, "PAIRED": shape["PAIRED"]}
    arguments = WALK_ARGUMENTS if walk else ARGUMENTS
    out_type = "*fp8e4nv" if quant else "*bf16"
    signature = {name: (out_type if name == "out_ptr" else kind) for name, kind, _ in arguments}
    constants = {"INPUT": input_mode, "NORM": norm, "QUANT": module.QUANT_CODES[quant], "GROUP": group,
                 "FP8_MAX_C": numerics.FP8_MAX, "MIN_SCALE": numerics.FP8_MIN_SCALE, **shape}
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, (_, _, is_aligned) in enumerate(arguments) if is_aligned}
    source = triton.compiler.ASTSource(fn=module._row_walk_kernel if walk else module._row_kernel,
                                      signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": module._warps(block)})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        return subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("form", choices=list(FORMS))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1, help="num_tokens: chooses prefetch as run_rows does")
    parser.add_argument("--version", default=triton_rows.__file__, help="a copy of kernels/triton_rows.py")
    parser.add_argument("--arch", type=int, default=90, help="compute capability times 10 (90: H100, H200)")
    parser.add_argument("--all", action="store_true", help="every instruction, not only the critical ones")
    parser.add_argument("--walk", action="store_true",
                        help="the row-walk kernel (a program walks rows, the next row's loads issued early)")
    args = parser.parse_args()
    if args.walk and not triton_rows.needs_whole_row(FORMS[args.form][1], FORMS[args.form][2]):
        parser.error(f"--walk: {args.form} is an elementwise form; the row walk serves the whole-row forms")
    code = sass(load(args.version), args.form, args.hidden, args.rows, args.arch, args.walk)
    lines = [line.strip() for line in code.splitlines() if line.strip().startswith("/*")]
    print("\n".join(line for line in lines if args.all or CRITICAL.search(line)))
    print(f"-- {len(lines)} instructions")


if __name__ == "__main__":
    main()
