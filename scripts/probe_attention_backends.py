"""Issue 22: which causal prefill attention is fastest here, at the Llama-3.1-8B head layout (32 Q heads, 8 KV heads,
head size 128, bf16)? Ours (the Triton kernel in kernels/triton_attention.py, called directly: the
``fusiontune::attention`` op dispatches by size) against torch's scaled_dot_product_attention with each backend it
has (flash, cuDNN, memory-efficient), and the fused attention + FP8 static quant (ours) against cuDNN's attention then
our quant kernel, the unfused pair it competes with. Each is timed as bench-kernels times a kernel (a CUDA graph over
input sets that together exceed the L2, replayed) and checked against the fp32 reference. Prints one table: median
us, p10-p90, TFLOP/s (causal: half the 4 T^2 H D of full attention).

    python3 scripts/probe_attention_backends.py [OLD_triton_attention.py]   (a copy of the kernel file, for an A/B)"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusiontune.kernels  # noqa: F401
from fusiontune.harness.timing import time_per_call
from fusiontune.kernels import triton_attention
from compare_row_kernels import load  # noqa: E402  (a copy of a kernels/ module, beside ours)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
ops = torch.ops.fusiontune


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                                 is_causal=True, scale=HEAD_DIM ** -0.5, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)  # SDPA's fused backends take [batch, heads, T, D]
    return run


def main() -> None:
    scale = torch.tensor([0.02], device="cuda")
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    ways = {"ours (Triton)": lambda q, k, v: triton_attention.attention(q, k, v, HEAD_DIM ** -0.5),
            "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa cudnn": cudnn,
            "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "ours +fp8 fused": lambda q, k, v: triton_attention.attention(q, k, v, HEAD_DIM ** -0.5, scale),
            "cudnn, then quant": lambda q, k, v: ops.quant_fp8_static(cudnn(q, k, v), scale)}
    if len(sys.argv) > 1:
        old = load(sys.argv[1], prefix="attention")
        ways["old (Triton)"] = lambda q, k, v: old.attention(q, k, v, HEAD_DIM ** -0.5)
        ways["old +fp8 fused"] = lambda q, k, v: old.attention(q, k, v, HEAD_DIM ** -0.5, scale)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'tokens':>6} {'way':16} {'median us':>10} {'p10-p90':>17} {'TFLOP/s':>8} {'max err':>8}")
    for tokens in (128, 512, 1024, 2048, 4096, 8192, 16384):
        sets = max(1, min(8, (200 << 20) // (tokens * (HEADS + 2 * KV_HEADS) * HEAD_DIM * 2)))
        inputs = [{name: torch.randn(tokens, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                   for name, h in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))} for _ in range(sets)]
        i = inputs[0]
        ref = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (i["q"], i["k"], i["v"])),
                                             is_causal=True, scale=HEAD_DIM ** -0.5, enable_gqa=True)
        ref = ref.transpose(0, 1).reshape(tokens, -1)
        flops = 2 * tokens * tokens * HEADS * HEAD_DIM  # causal: half of 4 T^2 Hq D
        for name, way in ways.items():
            try:
                out = way(i["q"], i["k"], i["v"])
                err = ((out.float() * (scale if out.dtype == torch.float8_e4m3fn else 1)) - ref).abs().max().item()
                times = time_per_call(lambda d, w=way: w(d["q"], d["k"], d["v"]), inputs, replays=20)
            except Exception as exc:  # noqa: BLE001 - a backend this build or GPU lacks is said, not fatal
                print(f"{tokens:>6} {name:16} unavailable: {type(exc).__name__}: {str(exc)[:90]}")
                continue
            q = statistics.quantiles(times, n=10)
            median = statistics.median(times)
            print(f"{tokens:>6} {name:16} {median:>10.1f} {q[0]:>8.1f}-{q[-1]:<8.1f} "
                  f"{flops / median / 1e6:>8.0f} {err:>8.4f}")


if __name__ == "__main__":
    main()
