"""The attention kernel's launch choices on this GPU: block sizes, warps and pipeline stages, writing bf16 and FP8,
at causal sequence lengths, beside FlashInfer's prefill kernel when installed. Prints one table (median µs of 20
CUDA-graph replays) to choose ``triton_attention._blocks`` from, and to see what the FP8 epilogue costs."""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch

from fusiontune.harness.bench_kernels import flashinfer_peer, time_per_call
from fusiontune.kernels import triton_attention as ta
from fusiontune.kernels.numerics import FP8_DTYPE, FP8_MAX

HEADS, KV_HEADS, D = 32, 8, 128


def launch(q, k, v, out, scale, block_m, block_n, warps, stages):
    tokens = q.shape[0]
    ta._attention_kernel[(HEADS, math.ceil(tokens / block_m))](
        q, k, v, out, scale if out.dtype == FP8_DTYPE else q, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), tokens, D ** -0.5 * math.log2(math.e), GROUP=HEADS // KV_HEADS, D=D,
        BLOCK_M=block_m, BLOCK_N=block_n, OUT_FP8=out.dtype == FP8_DTYPE, FP8_MAX_C=FP8_MAX, num_warps=warps,
        num_stages=stages)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", metavar="M,N,W,S",
                        help="block_m,block_n,warps,stages to time (repeatable); default: a grid of them")
    parser.add_argument("--tokens", type=int, action="append", help="default 512 4096 16384")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every config this many times, interleaved, and print the median of the rounds")
    args = parser.parse_args()
    configs = ([tuple(int(x) for x in c.split(",")) for c in args.config] if args.config
               else list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))))
    fi, status = flashinfer_peer()
    print(f"{torch.cuda.get_device_name()}, FlashInfer: {status}; median of {args.rounds} interleaved round(s)")
    print("| tokens | block_m | block_n | warps | stages | bf16 µs | fp8 µs | fp8 / bf16 |")
    for tokens in args.tokens or (512, 4096, 16384):
        q, k, v = (torch.randn(tokens, h, D, device="cuda", dtype=torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
        scale = torch.tensor([0.02], device="cuda")
        outs = {dtype: torch.empty(tokens, HEADS * D, device="cuda", dtype=dtype)
                for dtype in (torch.bfloat16, FP8_DTYPE)}
        rounds = {(config, dtype): [] for config in configs for dtype in outs}
        for _ in range(args.rounds):
            for (config, dtype), times in rounds.items():
                try:
                    times.append(statistics.median(time_per_call(
                        lambda _: launch(q, k, v, outs[dtype], scale, *config), [{}], replays=20)))
                except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is reported
                    times.append(float("nan"))
                    print(f"  {config} {dtype}: {type(exc).__name__}")
        for config in configs:
            bf16, fp8 = (statistics.median(rounds[config, dtype]) for dtype in outs)
            print(f"| {tokens} | {' | '.join(map(str, config))} | {bf16:.1f} | {fp8:.1f} | {fp8 / bf16:.2f} |",
                  flush=True)
    if fi is None:
        return
    for tokens in (512, 4096, 16384):  # last: FlashInfer compiles its kernel on first use
        q, k, v = (torch.randn(tokens, h, D, device="cuda", dtype=torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
        us = statistics.median(time_per_call(lambda _: fi.single_prefill_with_kv_cache(
            q, k, v, causal=True, sm_scale=D ** -0.5), [{}], replays=20))
        print(f"| {tokens} | FlashInfer single_prefill_with_kv_cache | | | | {us:.1f} | | |", flush=True)


if __name__ == "__main__":
    main()
