"""How many heads a program of the per-head kernel (RoPE, Q/K norm + RoPE) should take, on the GPU: times
``rotary_embedding`` and ``qk_norm_rope`` on Llama-shaped qkv projections (Q heads = H / 128, K heads = Q / 4) with
``triton_heads.heads_per_program`` as it is ("rule"), as it was before 2026-12-07 (as many heads as fit 4096
elements: "fit") and fixed at each power of two; and RoPE of Q and K in one launch against one each:

    python3 scripts/probe_head_blocks.py [--hidden 4096 8192] [--tokens 1 64 4096 16384] [--fixed 4 8 16 32]
"""

import argparse
import statistics

import torch

from fusiontune.harness.bench_kernels import time_per_call
from fusiontune.kernels import triton_heads
from fusiontune.kernels.rope import split_heads

HEAD_DIM = 128


def fit(total_heads: int, block: int) -> int:
    """The rule before 2026-12-07."""
    return min(triton_heads.triton.next_power_of_2(total_heads),
               max(1, triton_heads.MAX_PROGRAM_ELEMENTS // (2 * block)))


def two_launches(i):
    """RoPE of Q, then of K, one launch each (the op before 2026-12-07)."""
    outs = []
    for x in split_heads(i["qkv"], *i["heads"], HEAD_DIM):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        triton_heads._launch(x, x.stride(0), out, out, x.shape[1], 0, x.shape[2], i["cos"], i["sin"], True)
        outs.append(out)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 16384])
    parser.add_argument("--fixed", type=int, nargs="*", default=[4, 8, 16, 32])
    args = parser.parse_args()
    rule = triton_heads.heads_per_program
    choices = {"rule": rule, "fit": fit, **{str(n): (lambda total, block, n=n: n) for n in args.fixed}}
    forms = {
        "rope": lambda i: triton_heads.rotary_embedding(*split_heads(i["qkv"], *i["heads"], HEAD_DIM), i["cos"],
                                                        i["sin"], True),
        "rope, 2 launches": two_launches,
        "qk_norm+rope": lambda i: triton_heads.qk_norm_rope(i["qkv"], i["w"], i["w"], i["cos"], i["sin"], 1e-6,
                                                            *i["heads"], HEAD_DIM, True),
    }
    print(f"{'form':<18} {'hidden':>6} {'tokens':>6} " + " ".join(f"{c:>8}" for c in choices)
          + "   (us, median of 30 graph replays; heads per program: the rule, the old fit, fixed)")
    try:
        for form, run in forms.items():
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
                    for choice in choices.values():
                        triton_heads.heads_per_program = choice
                        cells.append(f"{statistics.median(time_per_call(run, sets)):>8.2f}")
                    triton_heads.heads_per_program = rule
                    print(f"{form:<18} {hidden:>6} {tokens:>6} " + " ".join(cells), flush=True)
    finally:
        triton_heads.heads_per_program = rule


if __name__ == "__main__":
    main()
