"""Does a version of the row kernel give the same bits in every specialisation? On the GPU, for each copy of
kernels/triton_rows.py given: the norm alone then the static / per-token quant op, against the fused norm + quant
(the differing FP8 codes and scales), and the norm against ``numerics.rms_norm`` (differing elements: 0 only for
a kernel that implements today's numerics), at 4096 tokens of hidden 2880, 4096 and 8192, bf16.

    python3 scripts/check_row_variants.py OLD.py NEW.py ...

A variant that sums squares in an order its layout picks fails the first two checks (fifteenth session: 1-15 codes
of 4096 x H differ); a fixed order or an fp64 sum passes them."""

from __future__ import annotations

import sys

import torch

from compare_row_kernels import load
from fusiontune.kernels import numerics


def main() -> None:
    for path in sys.argv[1:]:
        module, cells = load(path), []
        for hidden in (2880, 4096, 8192):
            g = torch.Generator(device="cuda").manual_seed(hidden)
            x = torch.randn(4096, hidden, device="cuda", generator=g).to(torch.bfloat16)
            w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(torch.bfloat16)
            scale = torch.tensor([0.01], device="cuda")
            normed = module.run_rows(x, weight=w, eps=1e-6)
            reference = int((normed.float() != numerics.rms_norm(x, w, 1e-6).float()).sum())
            fused = module.run_rows(x, weight=w, eps=1e-6, quant="fp8-static", scale=scale)
            static = int((fused.view(torch.uint8) != module.run_rows(normed, quant="fp8-static", scale=scale)
                          .view(torch.uint8)).sum())
            (q1, s1), (q2, s2) = (module.run_rows(x, weight=w, eps=1e-6, quant="fp8-per-token"),
                                  module.run_rows(normed, quant="fp8-per-token"))
            token = int((q1.view(torch.uint8) != q2.view(torch.uint8)).sum()) + int((s1 != s2).sum())
            cells.append(f"H={hidden}: vs numerics {reference}, fused static {static}, fused per-token {token}")
        print(f"{path}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
