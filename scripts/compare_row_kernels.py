"""A/B of versions of the row kernel in one process, on the GPU: the only fair way to judge a change of a few
percent (runs of different calls differ by that much).

    python3 scripts/compare_row_kernels.py OLD.py NEW.py ...   (each a copy of kernels/triton_rows.py)

Times each version's ``run_rows`` on the same inputs (CUDA-graph replays, inputs rotated past 4x the L2, as
bench-kernels does), interleaving versions per shape, and prints us and % of copy per version.
"""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import torch

from fusiontune.harness.bench_kernels import copy_bandwidth_gbs, time_per_call


def load(path: str):
    source = Path(path).read_text().replace("from .numerics", "from fusiontune.kernels.numerics")
    source = source.replace("from .quant", "from fusiontune.kernels.quant")
    name = f"rows_{Path(path).stem}"
    file = Path("/tmp") / f"{name}.py"  # Triton's JIT reads the kernel's source from its file
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


versions = {Path(p).stem: load(p) for p in sys.argv[1:]}
copy_gbs, _ = copy_bandwidth_gbs()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
FORMS = {  # name: (kwargs of run_rows, bytes moved per element of the output row, input width factor)
    "rms_norm": (lambda m, i: {"weight": i["w"]}, 4, 1),
    "add+rms_norm->static": (lambda m, i: {"input_mode": m.INPUT_ADD_RESIDUAL, "residual": i["r"], "weight": i["w"],
                                           "quant": "fp8-static", "scale": i["s"]}, 7, 1),
    "rms_norm->per-token": (lambda m, i: {"weight": i["w"], "quant": "fp8-per-token"}, 3, 1),
    "rms_norm->per-group": (lambda m, i: {"weight": i["w"], "quant": "fp8-per-group", "group_size": 128}, 3, 1),
    "silu->static": (lambda m, i: {"input_mode": m.INPUT_SILU_MUL, "quant": "fp8-static", "scale": i["s"]}, 5, 2),
}
print(f"copy {copy_gbs:.0f} GB/s; cells: median us (% of copy) of 30 graph replays")
print(f"{'form':<22} {'hidden':>6} {'tokens':>6} " + " ".join(f"{v:>18}" for v in versions))
for name, (kwargs_of, bytes_per_element, width) in FORMS.items():
    for hidden in (2880, 4096, 8192, 14336):
        for tokens in (1, 16, 64, 512, 4096, 16384):
            moved = tokens * hidden * bytes_per_element
            sets = [{"x": torch.randn(tokens, width * hidden, device="cuda", dtype=torch.bfloat16),
                     "r": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                     "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                     "s": torch.tensor([0.02], device="cuda")}
                    for _ in range(max(2, min(64, math.ceil(4 * l2 / moved))))]
            cells = []
            for module in versions.values():
                us = statistics.median(time_per_call(
                    lambda i, m=module: m.run_rows(i["x"], eps=1e-6, **kwargs_of(m, i)), sets))
                cells.append(f"{us:>9.2f} ({100 * moved / (us * 1e-6) / 1e9 / copy_gbs:3.0f}%)")
            print(f"{name:<22} {hidden:>6} {tokens:>6} " + " ".join(f"{c:>18}" for c in cells), flush=True)
            del sets
