"""The per-head kernel's launch choices on the GPU (RoPE, Q/K norm + RoPE), timed on Llama-shaped qkv projections
(Q heads = H / 128, K heads = Q / 4): heads per program as many as fit 4096 elements (the default, "fit") or the
candidate even split (``triton_heads.EVEN_HEAD_SPLIT``: 40 heads in programs of 8, "even") or fixed at a power of
two; and for RoPE, Q and K in one launch (``ONE_LAUNCH_QK``, "1L") against one launch each ("2L"):

    python3 scripts/probe_head_blocks.py [--hidden 4096 8192] [--tokens 1 64 4096 16384] [--fixed 8 16 32]
"""

import argparse
import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import triton_heads
from fusiontune.kernels.rope import split_heads

HEAD_DIM = 128
FORMS = {
    "rope": lambda i: triton_heads.rotary_embedding(*split_heads(i["qkv"], *i["heads"], HEAD_DIM), i["cos"], i["sin"],
                                                    True),
    "qk_norm+rope": lambda i: triton_heads.qk_norm_rope(i["qkv"], i["w"], i["w"], i["cos"], i["sin"], 1e-6,
                                                        *i["heads"], HEAD_DIM, True),
}


def variants(fixed: list[int]) -> dict[str, dict]:
    """Column name -> the module settings it runs under (``heads``: a fixed heads-per-program, or None)."""
    out = {f"{split}/{launches}": {"EVEN_HEAD_SPLIT": split == "even", "ONE_LAUNCH_QK": launches == "1L",
                                   "heads": None}
           for split in ("fit", "even") for launches in ("2L", "1L")}
    out.update({f"{n}/1L": {"EVEN_HEAD_SPLIT": False, "ONE_LAUNCH_QK": True, "heads": n} for n in fixed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 16384])
    parser.add_argument("--fixed", type=int, nargs="*", default=[8, 16, 32])
    args = parser.parse_args()
    saved = {name: getattr(triton_heads, name) for name in ("EVEN_HEAD_SPLIT", "ONE_LAUNCH_QK", "heads_per_program")}
    columns = variants(args.fixed)
    print(f"{'form':<14} {'hidden':>6} {'tokens':>6} " + " ".join(f"{c:>9}" for c in columns)
          + "   (us, median of 30 graph replays; heads per program / launches; the default is fit/2L; "
          "Q/K norm + RoPE is one launch in every column)")
    try:
        for form, run in FORMS.items():
            for hidden in args.hidden:
                q_heads = hidden // HEAD_DIM
                for tokens in args.tokens:
                    sets = [{"qkv": torch.randn(tokens, hidden + 2 * hidden // 4, device="cuda",
                                                dtype=torch.bfloat16),
                             "w": torch.ones(HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                             "cos": torch.rand(tokens, HEAD_DIM // 2, device="cuda"),
                             "sin": torch.rand(tokens, HEAD_DIM // 2, device="cuda"),
                             "heads": (q_heads, q_heads // 4)} for _ in range(8)]
                    cells = []
                    for setting in columns.values():
                        triton_heads.EVEN_HEAD_SPLIT = setting["EVEN_HEAD_SPLIT"]
                        triton_heads.ONE_LAUNCH_QK = setting["ONE_LAUNCH_QK"]
                        triton_heads.heads_per_program = (
                            saved["heads_per_program"] if setting["heads"] is None
                            else (lambda total, block, n=setting["heads"]: n))
                        cells.append(f"{statistics.median(time_per_call(run, sets)):>9.2f}")
                    print(f"{form:<14} {hidden:>6} {tokens:>6} " + " ".join(cells), flush=True)
    finally:
        for name, value in saved.items():
            setattr(triton_heads, name, value)


if __name__ == "__main__":
    main()
