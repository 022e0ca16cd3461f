"""Kernel benchmark: each row-wise op of kernels/ (fused and unfused) against its peers, on one GPU.

A case is an operator, a way to make its inputs, the bytes it must move (each input read once, each output written
once) and its peers: the unfused chain of our kernels, Inductor's code for the same eager torch expression
(``torch.compile(mode="max-autotune-no-cudagraphs")``, compiled for each shape as a serving engine compiles its
CUDA-graph sizes; compiled once with num_tokens dynamic, its column moved by up to 7x between runs of a day; the norm
written as a serving engine writes it, ``native_rms_norm``), and FlashInfer's kernel where it has one and is
installed. Every implementation is timed the same way: a CUDA graph
that calls it once on each of R input sets (R chosen so the sets together are 4x the L2, so the cache does not
flatter small sizes), replayed; time per call = replay time / R, median and p10/p90 over replays. What the memory
can do (the best copy's and the best read-only stream's rates: ``MemoryLimit``, the limit a row's bytes are held
to) and an empty Triton kernel (the launch floor under CUDA graphs) are measured in the same run, and beside each
row a copy of its bytes at its size (``same_bytes_copy_us``): the launch, ramp and tail any kernel of that size pays.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import fusiontune.kernels  # noqa: F401
from fusiontune.kernels import QUANT_SCHEMES, numerics
from fusiontune.kernels.attention import causal_attention
from fusiontune.kernels.rope import split_heads

from . import bench_table
from .timing import time_per_call

ops = torch.ops.fusiontune
EPS = 1e-6
DEFAULT_HIDDEN = (2880, 4096, 8192, 14336)
DEFAULT_TOKENS = (1, 16, 64, 512, 4096, 16384)
HEAD_DIM = 128  # per-head cases: Qwen3's head size


@dataclass(frozen=True)
class Case:
    name: str
    fused: Callable  # our op on one input dict
    expression: Callable  # the same computation as eager torch (numerics) on the input dict, for Inductor
    unfused: Callable | None = None  # the chain of our unfused kernels
    flashinfer: Callable | None = None
    silu_input: bool = False  # input is [T, 2H]
    residual: bool = False
    quant: str | None = None
    group_size: int = 0
    heads: bool = False  # a per-head op on a qkv projection: H = Q heads x HEAD_DIM, KV heads = Q heads / 4
    pad_multiple: int = 0  # the output is zero-padded to a multiple of this (only for H that are not one)
    attention: bool = False  # causal attention over the qkv: compute-bound beyond a few hundred tokens
    kv_cache: bool = False  # also writes K and V into a paged cache

    def applies_to(self, hidden: int) -> bool:
        if self.heads:
            return hidden % (4 * HEAD_DIM) == 0
        if self.pad_multiple:
            return hidden % self.pad_multiple != 0
        return not self.group_size or hidden % self.group_size == 0

    def make_inputs(self, tokens: int, hidden: int, dtype: torch.dtype, seed: int, device: str = "cuda") -> dict:
        g = torch.Generator(device=device).manual_seed(seed)
        if self.heads:
            q_heads = hidden // HEAD_DIM
            angles = torch.rand(tokens, HEAD_DIM // 2, generator=g, device=device) * 6.28
            return {
                "qkv": torch.randn(tokens, hidden + 2 * hidden // 4, generator=g, device=device).to(dtype),
                "wq": (1 + 0.1 * torch.randn(HEAD_DIM, generator=g, device=device)).to(dtype),
                "wk": (1 + 0.1 * torch.randn(HEAD_DIM, generator=g, device=device)).to(dtype),
                "cos": angles.cos(), "sin": angles.sin(), "heads": (q_heads, q_heads // 4),
                "scale": torch.tensor([0.02], device=device),
                # a paged cache of twice the tokens, the tokens' slots scattered over it
                "k_cache": torch.zeros(_padded(2 * tokens, 16), q_heads // 4, HEAD_DIM, device=device, dtype=dtype),
                "v_cache": torch.zeros(_padded(2 * tokens, 16), q_heads // 4, HEAD_DIM, device=device, dtype=dtype),
                "slots": torch.randperm(2 * tokens, generator=g, device=device)[:tokens],
            }
        width = 2 * hidden if self.silu_input else hidden
        return {
            "x": torch.randn(tokens, width, generator=g, device=device).to(dtype),
            "residual": torch.randn(tokens, hidden, generator=g, device=device).to(dtype),
            "weight": (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype),
            "scale": torch.tensor([0.02], device=device),
        }

    def traffic(self, tokens: int, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
        """(bytes it must read, bytes it must write): each input read once, each output written once."""
        e = dtype.itemsize
        if self.attention:  # Q, K, V read once (K and V again per query block: in L2), the output written once
            return tokens * (hidden + hidden // 2) * e, tokens * hidden * (1 if self.quant else e)
        if self.kv_cache:  # Q, K, V and cos, sin read; Q and K written, and K and V written into the cache
            return (tokens * (hidden + hidden // 2) * e + tokens * HEAD_DIM * 4,
                    tokens * ((hidden + hidden // 4) + hidden // 2) * e)
        if self.heads:  # Q and K read and written once (V untouched), cos and sin and the norm weights read
            qk = tokens * (hidden + hidden // 4) * e
            return qk + tokens * HEAD_DIM * 4 + 2 * HEAD_DIM * e, qk
        read = tokens * hidden * e * (2 if self.silu_input or self.residual else 1)
        read += 0 if self.silu_input else hidden * e  # the norm weight
        out_width = _padded(hidden, self.pad_multiple) if self.pad_multiple else hidden
        written = tokens * out_width * (1 if self.quant else e)
        written += tokens * hidden * e if self.residual else 0
        if self.quant:
            written += tokens * QUANT_SCHEMES[self.quant].scales_per_row(hidden, self.group_size) * 4
        return read, written

    def bytes_moved(self, tokens: int, hidden: int, dtype: torch.dtype) -> int:
        return sum(self.traffic(tokens, hidden, dtype))


@functools.cache
def flashinfer_peer():
    """(the flashinfer module or None, what to say about it): a peer only where it is installed and imports."""
    if importlib.util.find_spec("flashinfer") is None:
        return None, "not installed"
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001 - an install that cannot import is reported, not fatal
        return None, f"installed but failed to import: {type(exc).__name__}: {str(exc)[:160]}"
    return flashinfer, f"flashinfer {getattr(flashinfer, '__version__', '?')}"


def cases() -> list[Case]:
    fi, _ = flashinfer_peer()
    n = numerics
    return [
        Case("rms_norm", lambda i: ops.rms_norm(i["x"], i["weight"], EPS),
             lambda i: native_rms_norm(i["x"], i["weight"], EPS),
             flashinfer=(lambda i: fi.norm.rmsnorm(i["x"], i["weight"], EPS)) if fi else None),
        Case("fused_add_rms_norm", lambda i: ops.fused_add_rms_norm(i["x"], i["residual"], i["weight"], EPS),
             lambda i: _add_norm(i["x"], i["residual"], i["weight"]), residual=True,
             flashinfer=(lambda i: fi.norm.fused_add_rmsnorm(i["x"], i["residual"], i["weight"], EPS)) if fi else None),
        Case("rms_norm->fp8-static", lambda i: ops.rms_norm_quant_fp8_static(i["x"], i["weight"], EPS, i["scale"]),
             lambda i: n.quant_fp8_static(native_rms_norm(i["x"], i["weight"], EPS), i["scale"]),
             unfused=lambda i: ops.quant_fp8_static(ops.rms_norm(i["x"], i["weight"], EPS), i["scale"]),
             quant="fp8-static"),
        Case("add+rms_norm->fp8-static",
             lambda i: ops.fused_add_rms_norm_quant_fp8_static(i["x"], i["residual"], i["weight"], EPS, i["scale"]),
             lambda i: _add_norm_quant(i["x"], i["residual"], i["weight"], i["scale"]),
             unfused=lambda i: ops.quant_fp8_static(
                 ops.fused_add_rms_norm(i["x"], i["residual"], i["weight"], EPS), i["scale"]),
             residual=True, quant="fp8-static"),
        Case("rms_norm->fp8-per-token", lambda i: ops.rms_norm_quant_fp8_per_token(i["x"], i["weight"], EPS),
             lambda i: n.quant_fp8_per_token(native_rms_norm(i["x"], i["weight"], EPS)),
             unfused=lambda i: ops.quant_fp8_per_token(ops.rms_norm(i["x"], i["weight"], EPS)),
             quant="fp8-per-token"),
        Case("rms_norm->fp8-per-group-128",
             lambda i: ops.rms_norm_quant_fp8_per_group(i["x"], i["weight"], EPS, 128),
             lambda i: n.quant_fp8_per_group(native_rms_norm(i["x"], i["weight"], EPS), 128),
             unfused=lambda i: ops.quant_fp8_per_group(ops.rms_norm(i["x"], i["weight"], EPS), 128),
             quant="fp8-per-group", group_size=128),
        Case("silu_and_mul", lambda i: ops.silu_and_mul(i["x"]),
             lambda i: n.silu_and_mul(i["x"]), silu_input=True),
        Case("silu_and_mul->fp8-static", lambda i: ops.silu_and_mul_quant_fp8_static(i["x"], i["scale"]),
             lambda i: n.quant_fp8_static(n.silu_and_mul(i["x"]), i["scale"]),
             unfused=lambda i: ops.quant_fp8_static(ops.silu_and_mul(i["x"]), i["scale"]),
             silu_input=True, quant="fp8-static"),
        Case("silu_and_mul->fp8-per-group-128", lambda i: ops.silu_and_mul_quant_fp8_per_group(i["x"], 128),
             lambda i: n.quant_fp8_per_group(n.silu_and_mul(i["x"]), 128),
             unfused=lambda i: ops.quant_fp8_per_group(ops.silu_and_mul(i["x"]), 128),
             silu_input=True, quant="fp8-per-group", group_size=128),
        Case("add+rms_norm->pad-256",
             lambda i: ops.fused_add_rms_norm_pad(i["x"], i["residual"], i["weight"], EPS, _padded(i["x"].shape[1])),
             lambda i: _add_norm_then_pad(i["x"], i["residual"], i["weight"]),
             unfused=lambda i: torch.nn.functional.pad(
                 ops.fused_add_rms_norm(i["x"], i["residual"], i["weight"], EPS),
                 (0, _padded(i["x"].shape[1]) - i["x"].shape[1])),
             residual=True, pad_multiple=256),
        Case("rotary_embedding", lambda i: ops.rotary_embedding(*_qk(i), i["cos"], i["sin"], True),
             lambda i: [n.rope(t, i["cos"], i["sin"], True) for t in _qk(i)], heads=True),
        Case("qk_norm+rotary_embedding",
             lambda i: ops.qk_norm_rope(i["qkv"], i["wq"], i["wk"], i["cos"], i["sin"], EPS, *i["heads"], HEAD_DIM,
                                        True),
             lambda i: [n.rope(native_rms_norm(t, w, EPS), i["cos"], i["sin"], True)
                        for t, w in zip(_qk(i), (i["wq"], i["wk"]))],
             unfused=lambda i: ops.rotary_embedding(*[ops.rms_norm(t.reshape(-1, HEAD_DIM), w, EPS).view(t.shape)
                                                      for t, w in zip(_qk(i), (i["wq"], i["wk"]))],
                                                    i["cos"], i["sin"], True),
             heads=True),
        Case("rotary_embedding+kv_cache",
             lambda i: (*ops.rotary_embedding_and_cache(*_qkv(i), i["cos"], i["sin"], True, *_caches(i)),
                        i["k_cache"], i["v_cache"]),
             lambda i: _rope_and_cache(i),
             unfused=lambda i: _rope_then_cache(i),
             heads=True, kv_cache=True),
        Case("attention", lambda i: ops.attention(*_qkv(i), HEAD_DIM ** -0.5),
             lambda i: causal_attention(*_qkv(i), HEAD_DIM ** -0.5), heads=True, attention=True,
             flashinfer=(lambda i: fi.single_prefill_with_kv_cache(*_qkv(i), causal=True,
                                                                    sm_scale=HEAD_DIM ** -0.5)) if fi else None),
        Case("attention->fp8-static",
             lambda i: ops.attention_quant_fp8_static(*_qkv(i), HEAD_DIM ** -0.5, i["scale"]),
             lambda i: n.quant_fp8_static(causal_attention(*_qkv(i), HEAD_DIM ** -0.5), i["scale"]),
             unfused=lambda i: ops.quant_fp8_static(ops.attention(*_qkv(i), HEAD_DIM ** -0.5), i["scale"]),
             heads=True, attention=True, quant="fp8-static"),
    ]


def _qk(i: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Q and K of the qkv projection, [T, heads, HEAD_DIM] views, as the model's attention splits them."""
    q_heads, kv_heads = i["heads"]
    return split_heads(i["qkv"], q_heads, kv_heads, HEAD_DIM)


def _qkv(i: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V of the qkv projection, [T, heads, HEAD_DIM] views."""
    q_heads, kv_heads = i["heads"]
    q, k = split_heads(i["qkv"], q_heads, kv_heads, HEAD_DIM)
    return q, k, i["qkv"][:, (q_heads + kv_heads) * HEAD_DIM:].unflatten(-1, (kv_heads, HEAD_DIM))


def _caches(i: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The caches as [blocks, 16, kv_heads, HEAD_DIM] and the slot mapping."""
    k_cache, v_cache = (c.view(-1, 16, *c.shape[1:]) for c in (i["k_cache"], i["v_cache"]))
    return k_cache, v_cache, i["slots"]


def _rope_then_cache(i: dict):
    q, k, v = _qkv(i)
    q, k = ops.rotary_embedding(q, k, i["cos"], i["sin"], True)
    ops.reshape_and_cache(k, v, *_caches(i))
    return q, k, i["k_cache"], i["v_cache"]


def _rope_and_cache(i: dict):
    """The eager expression: RoPE, then an index_put of K and V (Inductor fuses what it can)."""
    q, k, v = _qkv(i)
    q, k = numerics.rope(q, i["cos"], i["sin"], True), numerics.rope(k, i["cos"], i["sin"], True)
    k_cache, v_cache = i["k_cache"].index_put((i["slots"],), k), i["v_cache"].index_put((i["slots"],), v)
    return q, k, k_cache, v_cache


def native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as a serving engine hands it to Inductor (vLLM's ``RMSNorm.forward_static``): the mean of the fp32
    squares, summed in whatever order Inductor picks. Inductor's peer compiles this, not ``numerics.rms_norm``,
    which fixes the order (fp32 pairs within groups of 8, the groups in fp64) so that our fused and unfused kernels
    agree bit for bit: no engine asks that of Inductor, and its strided pair sums made Inductor's kernels 1.4-2.1x
    slower than ours at 4096 tokens and up (H100, 2026-12-06), a peer weaker than any engine runs."""
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _add_norm(x, residual, weight):
    total = numerics.residual_add(x, residual)
    return native_rms_norm(total, weight, EPS), total


def _padded(hidden: int, multiple: int = 256) -> int:
    return numerics.round_up(hidden, multiple)


def _add_norm_then_pad(x, residual, weight):
    normed, total = _add_norm(x, residual, weight)
    return torch.nn.functional.pad(normed, (0, _padded(x.shape[1]) - x.shape[1])), total


def _add_norm_quant(x, residual, weight, scale):
    total = numerics.residual_add(x, residual)
    return numerics.quant_fp8_static(native_rms_norm(total, weight, EPS), scale), total


COPY_SIZES = (1 << 30, 4 << 30)  # bytes copied: far past L2 (50 MB on an H100, 60 MB on an H200)
TRITON_COPIES = ((4096, 4), (8192, 8), (16384, 8), (16384, 16))  # (elements per program, warps)


@dataclass(frozen=True)
class MemoryLimit:
    """What the memory can do, as a limit on a kernel's time: ``copy_gbs`` (bytes read + written per second by the
    best device-to-device copy) and ``read_gbs`` (bytes per second by the best read-only stream). A copy moves as
    many bytes each way, but a kernel that reads more than it writes (SiLU-and-mul reads 2 bytes per byte out; a
    quant to FP8 reads 2 per 1) can beat the copy's rate: writes cost the memory more than reads. On an H200 two
    rows reached 101% of copy that way. So a kernel's limit is the time to read its bytes at the read rate and
    write its bytes at the write rate that makes a copy's time come out (1/copy = (1/read + 1/write) / 2), and
    a row is held to that (``percent``); for a row that reads as much as it writes it is the copy."""

    copy_gbs: float
    read_gbs: float
    ways: dict

    @property
    def read_limit_gbs(self) -> float:
        return max(self.read_gbs, self.copy_gbs)  # a read slower than a copy would be a bad measurement

    @property
    def write_gbs(self) -> float:
        return 1 / (2 / self.copy_gbs - 1 / self.read_limit_gbs)

    def limit_us(self, read: int, written: int) -> float:
        return (read / self.read_limit_gbs + written / self.write_gbs) / 1e3

    def percent(self, read: int, written: int, us: float) -> float:
        """How close a kernel that took ``us`` came to the limit for its bytes (100 = at the limit)."""
        return 100 * self.limit_us(read, written) / us


def memory_limit() -> MemoryLimit:
    """The copy ceiling (``copy_bandwidth_gbs``) and the read rate (``read_bandwidth_gbs``), each the best of
    several ways, with every way's figure."""
    copy_gbs, copy_ways = copy_bandwidth_gbs()
    read_gbs, read_ways = read_bandwidth_gbs()
    return MemoryLimit(copy_gbs, read_gbs, {**copy_ways, **read_ways})


def copy_bandwidth_gbs() -> tuple[float, dict[str, float]]:
    """The copy ceiling every memory-bound row is held to: device-to-device copies, bytes read + written, the best
    of several ways (GB/s), and each way's figure. torch's ``copy_`` of contiguous tensors of one dtype is
    cudaMemcpyAsync device to device, timed eagerly and as a CUDA-graph node; a plain Triton copy at a few block
    sizes can beat it (on the H100 copy_ reached 2.4 TB/s and a Triton copy 2.96; on an H200 copy_ in a graph 2.77,
    a Triton copy 4.14). One way at one size read 4064 GB/s on an H200 that copies at about 4.3 TB/s, and rows then
    reached 106% "of copy"."""
    import triton

    _copy = _copy_kernel()
    ways: dict[str, float] = {}
    for size in COPY_SIZES:
        n = size // 2
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        ways[f"copy_ {size >> 30} GiB"] = _gbs(2 * size, _in_graph(lambda _: dst.copy_(src)))
        ways[f"copy_ eager {size >> 30} GiB"] = _gbs(2 * size, _eager_us(lambda: dst.copy_(src)))
        for block, warps in TRITON_COPIES:
            ways[f"triton {block}/{warps}w {size >> 30} GiB"] = _gbs(2 * size, _in_graph(
                lambda _, b=block, w=warps: _copy[(triton.cdiv(n, b),)](src, dst, n, BLOCK=b, num_warps=w)))
        del src, dst
    return max(ways.values()), ways


@functools.cache
def _copy_kernel():
    """A plain Triton copy of n elements, BLOCK per program (the copy ceiling's and the same-bytes copy's)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    return _copy


SAME_BYTES_COPIES = ((4096, 4), (8192, 8))  # (elements per program, warps): the Triton copies timed per row


def same_bytes_copy_us(moved: int, sets: int) -> tuple[float, float, float]:
    """(median, p10, p90) us of a copy that moves ``moved`` bytes (half read, half written) at this size, timed
    as the rows are (``sets`` buffers rotated, CUDA graphs): the best of ``copy_`` and a few Triton copies. The
    copy ceiling is a rate at 1-4 GiB; at a row's size a copy also pays the launch, the first round trip to
    memory and the last wave's tail, and this is what any kernel moving these bytes pays. Rows show it beside
    ours (``copy_same_us``)."""
    import triton

    n = max(1, moved // 4)  # bf16 elements each way
    buffers = [{"src": torch.randn(n, dtype=torch.bfloat16, device="cuda"),
                "dst": torch.empty(n, dtype=torch.bfloat16, device="cuda")} for _ in range(sets)]
    _copy = _copy_kernel()
    ways = [lambda i: i["dst"].copy_(i["src"])] + [
        lambda i, b=block, w=warps: _copy[(triton.cdiv(n, b),)](i["src"], i["dst"], n, BLOCK=b, num_warps=w)
        for block, warps in SAME_BYTES_COPIES]
    return min((_stats(time_per_call(way, buffers)) for way in ways), key=lambda stats: stats[0])


def read_bandwidth_gbs() -> tuple[float, dict[str, float]]:
    """Bytes read per second by a stream that only reads, the best of a few ways (GB/s), and each way's figure:
    a Triton kernel that sums its block into one fp32 per program (what it writes is 1/2048 of what it reads or
    less), at the copy's block sizes and sizes, and torch's ``sum``."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read(src, partial, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(partial + tl.program_id(0), tl.sum(tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)))

    ways: dict[str, float] = {}
    for size in COPY_SIZES:
        n = size // 2
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        ways[f"read: sum {size >> 30} GiB"] = _gbs(size, _in_graph(lambda _: src.sum()))
        for block, warps in TRITON_COPIES:
            partial = torch.empty(triton.cdiv(n, block), dtype=torch.float32, device="cuda")
            ways[f"read: triton {block}/{warps}w {size >> 30} GiB"] = _gbs(size, _in_graph(
                lambda _, b=block, w=warps, p=partial: _read[(triton.cdiv(n, b),)](src, p, n, BLOCK=b, num_warps=w)))
        del src
    return max(ways.values()), ways


def _gbs(moved: int, us: float) -> float:
    return moved / (us * 1e-6) / 1e9


def _in_graph(fn) -> float:
    return statistics.median(time_per_call(fn, [{}], replays=20))


def _eager_us(fn: Callable[[], object], calls: int = 10) -> float:
    """Microseconds per call of ``fn`` run eagerly, the mean of ``calls`` between two events after 3 untimed."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def empty_kernel_us() -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(ptr):
        pass

    buf = torch.empty(1, device="cuda")
    # The lowest of three medians: one run of the day read 2.66 us where the others read 0.87, and a floor that
    # is too high flatters every small-size row held against it.
    return min(statistics.median(time_per_call(lambda _: _empty[(1,)](buf), [{}] * 64, replays=20))
               for _ in range(3))


def _stats(times: list[float]) -> tuple[float, float, float]:
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), deciles[0], deciles[-1]


PEERS = ("ours", "unfused", "inductor", "flashinfer")
FIELDS = ["device", "op", "hidden", "num_tokens", "dtype", "bytes", "bytes_read", "input_sets", "copy_gbs", "read_gbs",
          "empty_kernel_us", "limit_us", "copy_same_us", "copy_same_p10_us", "copy_same_p90_us", "ours_gbs",
          "ours_pct_copy", "ours_pct_limit"] + [
    f"{p}_{k}" for p in PEERS for k in ("us", "p10_us", "p90_us", "error")]


def run(hidden_sizes=DEFAULT_HIDDEN, num_tokens=DEFAULT_TOKENS, dtype=torch.bfloat16, names: list[str] | None = None,
        csv_path: Path | None = None, progress: Callable[[str], None] = print, resume: bool = False) -> list[dict]:
    """Measure every selected (op, hidden, num_tokens) row and return them; each is written to ``csv_path`` as it
    is measured. With ``resume``, the rows ``csv_path`` already has (an earlier run on this GPU type and dtype, cut
    short) are kept and not measured again (``bench_table``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench-kernels needs a CUDA GPU")
    device = torch.cuda.get_device_name(0)
    dtype_name = str(dtype).removeprefix("torch.")
    earlier = (bench_table.earlier_rows(csv_path, FIELDS, {"device": device, "dtype": dtype_name})
               if resume and csv_path else [])
    done = {bench_table.row_key(row) for row in earlier}
    memory, floor_us = memory_limit(), empty_kernel_us()
    copy_gbs = memory.copy_gbs
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    each = ", ".join(f"{way} {gbs:.0f}" for way, gbs in memory.ways.items())
    progress(f"{device}: copy {copy_gbs:.0f} GB/s, read {memory.read_gbs:.0f} GB/s (so writes at "
             f"{memory.write_gbs:.0f}), each the best of: {each}; empty Triton kernel {floor_us:.2f} us under CUDA "
             "graphs")
    rows = list(earlier)
    sink, writer = bench_table.open_table(csv_path, FIELDS, append=resume) if csv_path else (None, None)
    selected = [case for case in cases() if not names or case.name in names]
    progress(f"FlashInfer: {flashinfer_peer()[1]}")
    if done:
        progress(f"resuming {csv_path}: {len(done)} rows kept, measured before")
    for case in selected:
        for hidden in hidden_sizes:
            if not case.applies_to(hidden):
                continue
            for tokens in num_tokens:
                if (case.name, hidden, tokens) in done:
                    continue
                compiled = _inductor(case.expression)
                read, written = case.traffic(tokens, hidden, dtype)
                moved = read + written
                sets = max(2, min(64, math.ceil(4 * l2 / moved)))
                inputs = [case.make_inputs(tokens, hidden, dtype, seed=s) for s in range(sets)]
                row = {"device": device, "op": case.name, "hidden": hidden, "num_tokens": tokens,
                       "dtype": dtype_name, "bytes": moved, "bytes_read": read,
                       "input_sets": sets, "copy_gbs": round(copy_gbs, 1), "read_gbs": round(memory.read_gbs, 1),
                       "empty_kernel_us": round(floor_us, 3), "limit_us": round(memory.limit_us(read, written), 3)}
                row.update(zip(("copy_same_us", "copy_same_p10_us", "copy_same_p90_us"),
                               (round(t, 3) for t in same_bytes_copy_us(moved, sets))))
                peers = {"ours": case.fused, "unfused": case.unfused,
                         "inductor": compiled,
                         "flashinfer": case.flashinfer}
                for peer, fn in peers.items():
                    if fn is None:
                        row[f"{peer}_us"] = None
                        continue
                    try:
                        median, p10, p90 = _stats(time_per_call(fn, inputs))
                    except Exception as exc:  # a peer that cannot run this shape: say so, keep going
                        row[f"{peer}_us"], row[f"{peer}_error"] = None, f"{type(exc).__name__}: {exc}"[:200]
                        continue
                    row.update({f"{peer}_us": round(median, 3), f"{peer}_p10_us": round(p10, 3),
                                f"{peer}_p90_us": round(p90, 3)})
                ours = row["ours_us"]
                row["ours_gbs"] = round(_gbs(moved, ours), 1) if ours else None
                row["ours_pct_copy"] = round(100 * row["ours_gbs"] / copy_gbs, 1) if ours else None
                row["ours_pct_limit"] = round(memory.percent(read, written, ours), 1) if ours else None
                rows.append(row)
                if writer:  # written as measured: a run cut short keeps every finished row
                    writer.writerow(row)
                    sink.flush()
                progress(_line(row))
                del inputs
            torch.cuda.empty_cache()
    if sink:
        sink.close()
    return rows


def _inductor(expression: Callable) -> Callable:
    """A fresh static-shape compile of ``expression`` for one shape: dynamo's cache is keyed on the function's code,
    so without a reset every shape after the recompile limit would silently run eager."""
    torch._dynamo.reset()
    return torch.compile(expression, mode="max-autotune-no-cudagraphs", dynamic=False)


def _line(row: dict) -> str:
    def us(key):
        return f"{row[key]:.2f}" if row.get(key) else "-"

    spread = f"({row['ours_p10_us']:.2f}-{row['ours_p90_us']:.2f})" if row.get("ours_us") else ""
    return (f"{row['op']:<32} H={row['hidden']:<6} T={row['num_tokens']:<6} ours {us('ours_us')} us "
            f"{spread} {row['ours_gbs']} GB/s = {row['ours_pct_copy']}% copy, {row['ours_pct_limit']}% of the "
            "read/write limit"
            f" | copy of the same bytes {us('copy_same_us')} | unfused {us('unfused_us')} | inductor "
            f"{us('inductor_us')} | flashinfer {us('flashinfer_us')}")
