"""A/B of versions of the row kernel in one process, on the GPU: the only fair way to judge a change of a few
percent (runs of different calls differ by that much).

    python3 scripts/compare_row_kernels.py OLD.py NEW.py ... [--hidden 4096 --tokens 16384 --form rms_norm ...]
    python3 scripts/compare_row_kernels.py kernels/triton_rows.py:ELEMENTWISE_TILE=256 kernels/triton_rows.py

Each version is a copy of kernels/triton_rows.py, optionally with module constants set (``PATH:NAME=VALUE,...``:
a tile, a row bound), which spares a copy per value. Times each version's ``run_rows`` on the same inputs (CUDA-graph
replays, inputs rotated past 4x the L2, as bench-kernels does), interleaving versions per shape, and prints median us
(p10-p90 of the replays) and % of copy per version. Beside them, the same traffic with no reduction: torch casting
the input to the output's dtype (a bf16 copy for rms_norm, bf16 -> FP8 for the quantising forms; none for the forms
that read two inputs), which shows what a kernel of this size reaches when it has nothing to compute (launch and
DRAM ramp included, which the copy ceiling at 4 GiB is not). With ``--inductor``, Inductor's code for the form's
bench-kernels case too, timed in the same process: a gap to Inductor of a few percent at one token is below what
separate calls resolve.
"""

import argparse
import ast
import importlib.util
import math
from pathlib import Path

import torch

from fusiontune.harness import bench_kernels as bench
from fusiontune.harness.bench_kernels import copy_bandwidth_gbs, time_per_call
from fusiontune.harness.timing import summarize


def load(path: str, prefix: str = "rows"):
    """Another version of a module of kernels/ (a copy with changes), importable beside the package's own: its
    relative imports made absolute, and written out, since Triton's JIT reads a kernel's source from its file."""
    source = Path(path).read_text().replace("from .", "from fusiontune.kernels.")
    name = f"{prefix}_{Path(path).stem}"
    file = Path("/tmp") / f"{name}.py"  # Triton's JIT reads the kernel's source from its file
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_version(spec: str):
    """(column label, module) of ``PATH[:NAME=VALUE,...]``: the copy at PATH, then each named module constant set to
    its (Python literal) value. Raises ValueError naming what is wrong."""
    path, _, settings = spec.partition(":")
    module = load(path)
    if not settings:
        return Path(path).stem, module
    for setting in settings.split(","):
        name, equals, value = setting.partition("=")
        if not equals or not hasattr(module, name) or not isinstance(getattr(module, name), (int, float)):
            raise ValueError(f"version {spec!r}: {name!r} is not a numeric constant of {path} (NAME=VALUE)")
        try:
            setattr(module, name, type(getattr(module, name))(ast.literal_eval(value)))
        except (ValueError, SyntaxError):
            raise ValueError(f"version {spec!r}: {value!r} is not a number for {name}") from None
    return settings, module


FP8 = torch.float8_e4m3fn
# name: (kwargs of run_rows, bytes moved per element of the output row, input width factor, output dtype,
#        the bench-kernels case of the same expression: Inductor's peer)
FORMS = {
    "rms_norm": (lambda m, i: {"weight": i["w"]}, 4, 1, torch.bfloat16, "rms_norm"),
    "add+rms_norm": (lambda m, i: {"input_mode": m.INPUT_ADD_RESIDUAL, "residual": i["r"], "weight": i["w"]}, 8, 1,
                     torch.bfloat16, "fused_add_rms_norm"),
    "rms_norm->static": (lambda m, i: {"weight": i["w"], "quant": "fp8-static", "scale": i["s"]}, 3, 1, FP8,
                         "rms_norm->fp8-static"),
    "add+rms_norm->static": (lambda m, i: {"input_mode": m.INPUT_ADD_RESIDUAL, "residual": i["r"], "weight": i["w"],
                                           "quant": "fp8-static", "scale": i["s"]}, 7, 1, FP8,
                             "add+rms_norm->fp8-static"),
    "rms_norm->per-token": (lambda m, i: {"weight": i["w"], "quant": "fp8-per-token"}, 3, 1, FP8,
                            "rms_norm->fp8-per-token"),
    "rms_norm->per-group": (lambda m, i: {"weight": i["w"], "quant": "fp8-per-group", "group_size": 128}, 3, 1, FP8,
                            "rms_norm->fp8-per-group-128"),
    "silu": (lambda m, i: {"input_mode": m.INPUT_SILU_MUL}, 6, 2, torch.bfloat16, "silu_and_mul"),
    "silu->static": (lambda m, i: {"input_mode": m.INPUT_SILU_MUL, "quant": "fp8-static", "scale": i["s"]}, 5, 2,
                     FP8, "silu_and_mul->fp8-static"),
    "silu->per-group": (lambda m, i: {"input_mode": m.INPUT_SILU_MUL, "quant": "fp8-per-group", "group_size": 128},
                        5, 2, FP8, "silu_and_mul->fp8-per-group-128"),
}


CELL = 27  # characters of a table cell


def cell(samples: list[float], moved: int, copy_gbs: float) -> str:
    """Median us, the p10-p90 spread of the replays (two versions differ only where the spreads are apart), % of
    copy."""
    summary = summarize(samples)
    median = summary["latency_ms"]  # (the summary's names say ms; these samples are us)
    return (f"{median:.3f} ({summary['latency_ms_p10']:.3f}-{summary['latency_ms_p90']:.3f}) "
            f"{100 * moved / (median * 1e-6) / 1e9 / copy_gbs:3.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+",
                        help="copies of kernels/triton_rows.py, each optionally PATH:NAME=VALUE,... (constants set)")
    parser.add_argument("--hidden", type=int, action="append", help="default 2880 4096 8192 14336")
    parser.add_argument("--tokens", type=int, action="append", help="default 1 16 64 512 4096 16384")
    parser.add_argument("--form", action="append", choices=list(FORMS), help="default: every form")
    parser.add_argument("--inductor", action="store_true", help="Inductor's code for each form too, same process")
    args = parser.parse_intermixed_args()  # versions and options in any order (device_kernels.sh --compare)
    try:
        versions = dict(load_version(spec) for spec in args.versions)
    except ValueError as error:
        parser.error(str(error))
    copy_gbs, _ = copy_bandwidth_gbs()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s; cells: median us (p10-p90) % of copy, of 30 "
          f"graph replays; 'cast' is the same bytes moved by torch with nothing to compute")
    columns = [*versions, "cast", *(["inductor"] if args.inductor else [])]
    print(f"{'form':<22} {'hidden':>6} {'tokens':>6} " + " ".join(f"{v:>{CELL}}" for v in columns))
    for name in args.form or list(FORMS):
        kwargs_of, bytes_per_element, width, out_dtype, case_name = FORMS[name]
        for hidden in args.hidden or (2880, 4096, 8192, 14336):
            for tokens in args.tokens or (1, 16, 64, 512, 4096, 16384):
                moved = tokens * hidden * bytes_per_element
                sets = [{"x": torch.randn(tokens, width * hidden, device="cuda", dtype=torch.bfloat16),
                         "r": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                         "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                         "s": torch.tensor([0.02], device="cuda"),
                         "o": torch.empty(tokens, hidden, device="cuda", dtype=out_dtype)}
                        for _ in range(max(2, min(64, math.ceil(4 * l2 / moved))))]
                runs = {v: (lambda i, m=m: m.run_rows(i["x"], eps=1e-6, **kwargs_of(m, i)))
                        for v, m in versions.items()}
                if width == 1 and "add" not in name:  # the peer moves the bytes the form moves
                    runs["cast"] = lambda i: i["o"].copy_(i["x"])
                cells = []
                for run in runs.values():
                    cells.append(cell(time_per_call(run, sets), moved, copy_gbs))
                if "cast" not in runs:
                    cells.append("-")
                if args.inductor:  # its own input sets (the case's), as many as ours, so the L2 holds as little
                    case = next(c for c in bench.cases() if c.name == case_name)
                    peer_sets = [case.make_inputs(tokens, hidden, torch.bfloat16, seed=k) for k in range(len(sets))]
                    compiled = bench._inductor(case.expression)
                    cells.append(cell(time_per_call(compiled, peer_sets), moved, copy_gbs))
                    del peer_sets
                print(f"{name:<22} {hidden:>6} {tokens:>6} " + " ".join(f"{c:>{CELL}}" for c in cells), flush=True)
                del sets


if __name__ == "__main__":
    main()
