"""Which part of the quantising row kernel costs time: times rms_norm -> fp8-static with the kernel as written and
with one change at a time. A diagnostic for the GPU (python3 scripts/probe_quant_variants.py); variants are for
timing only. Its first run (H100, 2026-11-24) found per-element IEEE division (``div_rn``) doubling the time at
hidden 2880, which is why quantisation now multiplies by a reciprocal; the variants below probe what is left."""

import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from fusiontune.harness.bench_kernels import time_per_call

SOURCE = (Path(__file__).resolve().parents[1] / "kernels" / "triton_rows.py").read_text()
RECIPROCAL = "tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)"
RTNE = ', fp_downcast_rounding="rtne"'
VARIANTS = {
    "as written": SOURCE,
    "approx reciprocal": SOURCE.replace(RECIPROCAL, "1.0 / scale"),
    "default fp8 cast": SOURCE.replace(RTNE, ""),
    "no clamp": SOURCE.replace("q = tl.clamp(vf * _reciprocal(scale), -FP8_MAX_C, FP8_MAX_C)",
                               "q = vf * _reciprocal(scale)"),
}
assert all(v != SOURCE for k, v in VARIANTS.items() if k != "as written"), "a variant did not change the source"


def load(name, text):
    folder = Path(tempfile.mkdtemp())
    (folder / "fusiontune_probe_rows.py").write_text(text.replace("from .numerics", "from fusiontune.kernels.numerics"))
    spec = importlib.util.spec_from_file_location(f"probe_{len(sys.modules)}", folder / "fusiontune_probe_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


modules = {name: load(name, text) for name, text in VARIANTS.items()}
print(f"{'hidden':>6} {'tokens':>6} " + " ".join(f"{n:>20}" for n in VARIANTS) + "   (us, median of 30 graph replays)")
for hidden in (2880, 3072, 4096, 14336):
    for tokens in (1, 4096):
        sets = [{"x": torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                 "w": torch.ones(hidden, device="cuda", dtype=torch.bfloat16)} for _ in range(8)]
        scale = torch.tensor([0.02], device="cuda")
        cells = []
        for name, module in modules.items():
            fn = lambda i, m=module: m.run_rows(i["x"], weight=i["w"], eps=1e-6, quant="fp8-static", scale=scale)
            cells.append(statistics.median(time_per_call(fn, sets)))
        print(f"{hidden:>6} {tokens:>6} " + " ".join(f"{c:>20.2f}" for c in cells))
