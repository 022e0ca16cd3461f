"""How many heads one program of the per-head kernel should take (RoPE, Q/K norm + RoPE), timed on the GPU on
Llama-shaped qkv projections (Q heads = H / 128, K heads = Q / 4, Q and K in one launch), the default
(``triton_heads.heads_per_program``) marked *:

    python3 scripts/probe_head_blocks.py [--hidden 4096 8192] [--tokens 1 64 4096 16384] [--heads 4 8 16 32]

On an H200 (2026-12-07, docs/benchmarks.md, eighteenth session) programs of 16 heads beat 32 by 14-25% for
Q/K norm + RoPE from 4096 tokens; one launch for Q and K beat a launch each by 1.0-1.3 us at 64 tokens.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 16384])
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 8, 16, 32], help="heads per program to time")
    args = parser.parse_args()
    default = triton_heads.heads_per_program
    print(f"{'form':<14} {'hidden':>6} {'tokens':>6} " + " ".join(f"{n:>8}h" for n in args.heads)
          + "   (us, median of 30 graph replays; heads per program, the default marked *)")
    try:
        for form, run in FORMS.items():
            for hidden in args.hidden:
                q_heads = hidden // HEAD_DIM
                chosen = default(q_heads + q_heads // 4, HEAD_DIM // 2)
                for tokens in args.tokens:
                    sets = [{"qkv": torch.randn(tokens, hidden + 2 * hidden // 4, device="cuda",
                                                dtype=torch.bfloat16),
                             "w": torch.ones(HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                             "cos": torch.rand(tokens, HEAD_DIM // 2, device="cuda"),
                             "sin": torch.rand(tokens, HEAD_DIM // 2, device="cuda"),
                             "heads": (q_heads, q_heads // 4)} for _ in range(8)]
                    cells = []
                    for n in args.heads:
                        triton_heads.heads_per_program = lambda total, block, n=n: n
                        us = statistics.median(time_per_call(run, sets))
                        cells.append(f"{us:>8.2f}{'*' if n == chosen else ' '}")
                    triton_heads.heads_per_program = default
                    print(f"{form:<14} {hidden:>6} {tokens:>6} " + " ".join(cells), flush=True)
    finally:
        triton_heads.heads_per_program = default


if __name__ == "__main__":
    main()
