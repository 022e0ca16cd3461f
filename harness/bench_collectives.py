"""Collective kernel benchmark (``bench-kernels --tp N``): each fused collective against its unfused peers, one
process per GPU, under CUDA graphs, across num_tokens and hidden sizes.

Cases, and the peers each is timed against:
- ``allreduce+add+rms_norm`` and ``allreduce+add+rms_norm->fp8-static``: fusiontune's one-kernel op in each of its
  forms (``fused_one_shot``, ``fused_two_shot``; the faster is the kernel's time) and as the model runs it
  (``fused``: the kernel where ``symm_mem.fused_method`` takes it, the unfused pair elsewhere); against NCCL's
  all-reduce then our fused add + norm kernel (``nccl_norm``), and torch's symmetric-memory one-shot / two-shot
  all-reduce then the same kernel (``one_shot_norm``, ``two_shot_norm``). The best of the three unfused pairs is
  the baseline a serving engine would run (``best_unfused``). Where flashinfer-python is installed, FlashInfer's
  fused kernel (``flashinfer``, the one vLLM runs) is timed beside them; ``speedup_vs_flashinfer`` is ours
  against it.
- ``all_gather+gemm`` (a column-parallel GEMM's gathered input, gate_up shape) and ``gemm+reduce_scatter`` (a
  row-parallel GEMM's output, down_proj shape): torch's symmetric-memory fused ops (AsyncTP) against the NCCL
  collective then the GEMM.

Every implementation is timed the same way: a CUDA graph calling it once on each of R input sets, replayed after
a barrier; the time per call of a replay is the slowest rank's (a TP step ends with its slowest rank), median and
p10 / p90 over replays. The crossover table says up to which size the fused op is faster than the best unfused
pair beyond their spread: that size in MB is what ``fi_allreduce_fusion_max_size_mb`` should be, beside vLLM's
hand table.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from fusiontune.kernels import flashinfer_allreduce, symm_mem
from fusiontune.passes.fusions import (FI_ALLREDUCE_FUSION_MAX_SIZE_MB, FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB,
                                       VLLM_TABLES)
from fusiontune.kernels.collectives import all_gathered, all_reduced, reduce_scattered

from . import bench_table
from .timing import slowest_rank, time_per_call

DEFAULT_TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
DEFAULT_HIDDEN = (4096, 8192)
INTERMEDIATE = {4096: 14336, 8192: 28672}  # Llama-3.1-8B / -70B MLP widths (others: 3.5 x hidden)
EPS = 1e-6
REPLAYS = 30


@dataclass(frozen=True)
class CollectiveCase:
    name: str
    peers: Callable[[str], dict[str, Callable[[dict], object]]]  # group name -> {peer: fn(inputs)}
    unfused: tuple[str, ...]  # the peers that are the unfused baseline (the best of them is the reference)
    kernel: tuple[str, ...]  # the fused kernel's forms (the fastest is its time)
    make_inputs: Callable[[int, int, int, int, int], dict]  # (tokens, hidden, rank, world, seed) -> inputs
    splits_tokens: bool = False  # the tokens are sharded over the ranks (num_tokens must divide by TP)
    symmetric: tuple[str, ...] = ()  # peers that stage the tensor in symmetric memory: none above its bound

    def applies(self, tokens: int, world: int) -> bool:
        return not self.splits_tokens or tokens % world == 0


def _norm_inputs(tokens, hidden, rank, world, seed, quant):
    g = torch.Generator(device="cuda").manual_seed(seed * 1009 + rank)
    return {"x": torch.randn(tokens, hidden, generator=g, device="cuda").to(torch.bfloat16),
            "residual": torch.randn(tokens, hidden, generator=g, device="cuda").to(torch.bfloat16),
            "weight": (1 + 0.1 * torch.randn(hidden, generator=g, device="cuda")).to(torch.bfloat16),
            "scale": torch.tensor([0.05], device="cuda") if quant else None}


def _allreduce_rms_case(quant: str | None) -> CollectiveCase:
    from fusiontune.kernels.triton_allreduce_rms import allreduce_add_rms_norm
    from fusiontune.kernels.triton_rows import INPUT_ADD_RESIDUAL, run_rows

    def norm(reduced, i):
        extra = {"quant": quant, "scale": i["scale"]} if quant else {}
        return run_rows(reduced, input_mode=INPUT_ADD_RESIDUAL, residual=i["residual"], weight=i["weight"], eps=EPS,
                        **extra)

    def peers(group: str) -> dict:
        op = getattr(torch.ops.fusiontune, "all_reduce_fused_add_rms_norm" + ("_quant_fp8_static" if quant else ""))
        args = (lambda i: (i["x"], i["residual"], i["weight"], EPS, i["scale"], group)) if quant else \
            (lambda i: (i["x"], i["residual"], i["weight"], EPS, group))
        return {
            "fused": lambda i: op(*args(i)),
            "fused_one_shot": lambda i: allreduce_add_rms_norm(i["x"], i["residual"], i["weight"], EPS, i["scale"],
                                                               group, two_shot=False),
            "fused_two_shot": lambda i: allreduce_add_rms_norm(i["x"], i["residual"], i["weight"], EPS, i["scale"],
                                                               group, two_shot=True),
            "nccl_norm": lambda i: norm(all_reduced(i["x"], group), i),
            "one_shot_norm": lambda i: norm(symm_mem.symm_mem_all_reduce(i["x"], group, "one-shot"), i),
            "two_shot_norm": lambda i: norm(symm_mem.symm_mem_all_reduce(i["x"], group, "two-shot"), i),
            **({"flashinfer": lambda i: flashinfer_allreduce.allreduce_add_rms_norm(
                i["x"], i["residual"], i["weight"], EPS, i["scale"], group)}
               if flashinfer_allreduce.available() else {}),
        }

    name = "allreduce+add+rms_norm" + (f"->{quant}" if quant else "")
    return CollectiveCase(name, peers, ("nccl_norm", "one_shot_norm", "two_shot_norm"), ("fused_one_shot",
                                                                                          "fused_two_shot"),
                          lambda t, h, r, w, s: _norm_inputs(t, h, r, w, s, quant),
                          symmetric=("fused_one_shot", "fused_two_shot", "one_shot_norm", "two_shot_norm",
                                     "flashinfer"))


def _intermediate(hidden: int) -> int:
    return INTERMEDIATE.get(hidden, int(3.5 * hidden))


def _gather_gemm_inputs(tokens, hidden, rank, world, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 1009 + rank)
    columns = 2 * _intermediate(hidden) // world  # gate_up_proj's shard
    return {"a": torch.randn(tokens // world, hidden, generator=g, device="cuda").to(torch.bfloat16),
            "b": (torch.randn(hidden, columns, generator=g, device="cuda") / math.sqrt(hidden)).to(torch.bfloat16),
            "rows": tokens}


def _gemm_scatter_inputs(tokens, hidden, rank, world, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 1009 + rank)
    inner = _intermediate(hidden) // world  # down_proj's shard
    return {"a": torch.randn(tokens, inner, generator=g, device="cuda").to(torch.bfloat16),
            "b": (torch.randn(inner, hidden, generator=g, device="cuda") / math.sqrt(inner)).to(torch.bfloat16)}


def cases() -> list[CollectiveCase]:
    ops = torch.ops.fusiontune
    return [
        _allreduce_rms_case(None),
        _allreduce_rms_case("fp8-static"),
        CollectiveCase("all_gather+gemm",
                       lambda g: {"fused": lambda i: ops.all_gather_matmul(i["a"], i["b"], i["rows"], g),
                                  "nccl_then_gemm": lambda i: all_gathered(i["a"], i["rows"], g) @ i["b"]},
                       ("nccl_then_gemm",), ("fused",), _gather_gemm_inputs, splits_tokens=True),
        CollectiveCase("gemm+reduce_scatter",
                       lambda g: {"fused": lambda i: ops.matmul_reduce_scatter(i["a"], i["b"], g),
                                  "gemm_then_nccl": lambda i: reduce_scattered(i["a"] @ i["b"], g)},
                       ("gemm_then_nccl",), ("fused",), _gemm_scatter_inputs, splits_tokens=True),
    ]


PEERS = ("fused", "fused_one_shot", "fused_two_shot", "nccl_norm", "one_shot_norm", "two_shot_norm", "flashinfer",
         "nccl_then_gemm", "gemm_then_nccl")
FIELDS = (["device", "tp", "op", "hidden", "num_tokens", "tensor_mb", "input_sets"]
          + [f"{p}_{k}" for p in PEERS for k in ("us", "p10_us", "p90_us")]
          + ["kernel", "kernel_us", "best_unfused", "best_unfused_us", "speedup_vs_best_unfused", "speedup_vs_nccl",
             "speedup_vs_flashinfer", "errors"])


def _input_sets(tokens: int, hidden: int) -> int:
    """Enough input sets that together they exceed the L2 (so no call finds its inputs there), at most 8."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(8, math.ceil(4 * l2 / (tokens * hidden * 2))))


def join_gpu_group(rank: int, world: int, port: int) -> torch.device:
    """This process as rank ``rank`` of an NCCL group of ``world`` processes on this host, one per GPU, on GPU
    ``rank``, NVLink multicast off (bench-kernels --tp, the collective kernel tests, the kernel probes)."""
    os.environ.update(symm_mem.MULTICAST_OFF)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    return device


def measure_rank(rank: int, world: int, port: int, hidden_sizes, num_tokens, names, csv_path: str | None,
                 earlier: list[dict] = ()) -> None:
    """One rank's part of the benchmark (every rank runs every case in the same order; rank 0 writes). ``earlier``:
    the rows a resumed table already has, which no rank measures again."""
    device = join_gpu_group(rank, world, port)
    group = dist.group.WORLD
    done = {bench_table.row_key(row) for row in earlier}

    writer, sink = None, None
    if rank == 0 and csv_path:
        sink, writer = bench_table.open_table(csv_path, FIELDS, append=bool(earlier))
    try:
        selected = [case for case in cases() if not names or case.name in names]
        name = torch.cuda.get_device_name(device)
        if rank == 0:
            print(f"{name} x {world}: {', '.join(c.name for c in selected)}; hidden {list(hidden_sizes)}, "
                  f"num_tokens {list(num_tokens)}; FlashInfer: "
                  + ("a peer of the all-reduce + norm cases" if flashinfer_allreduce.available() else
                     "not installed (no peer column)"), flush=True)
        rows = list(earlier)
        for case in selected:
            peers = case.peers(group.group_name)
            for hidden in hidden_sizes:
                for tokens in num_tokens:
                    if not case.applies(tokens, world) or (case.name, hidden, tokens) in done:
                        continue
                    row = _measure(case, peers, tokens, hidden, rank, world, device, group)
                    row.update({"device": name, "tp": world})
                    rows.append(row)
                    if writer:
                        writer.writerow({k: row.get(k) for k in FIELDS})
                        sink.flush()
                    if rank == 0:
                        print(_line(row), flush=True)
                    torch.cuda.empty_cache()
        if rank == 0:
            for line in crossovers(rows, world):
                print(line, flush=True)
    finally:
        if sink:
            sink.close()
        dist.barrier()
        dist.destroy_process_group()


def _measure(case: CollectiveCase, peers: dict, tokens: int, hidden: int, rank: int, world: int, device, group):
    sets = _input_sets(tokens, hidden)
    inputs = [case.make_inputs(tokens, hidden, rank, world, seed) for seed in range(sets)]
    row = {"op": case.name, "hidden": hidden, "num_tokens": tokens, "input_sets": sets,
           "tensor_mb": round(tokens * hidden * 2 / symm_mem.MiB, 4)}
    errors = []
    for peer, fn in peers.items():
        if peer in case.symmetric and tokens * hidden * 2 > symm_mem.SYMM_MEM_MAX_BYTES:
            continue
        try:
            times = slowest_rank(time_per_call(fn, inputs, replays=REPLAYS, barrier=group), device, group)
        except Exception as exc:  # noqa: BLE001 - the same on every rank (same shapes): say so, go on
            errors.append(f"{peer}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            torch.cuda.synchronize()
            continue
        deciles = statistics.quantiles(times, n=10, method="inclusive")
        row.update({f"{peer}_us": round(statistics.median(times), 3), f"{peer}_p10_us": round(deciles[0], 3),
                    f"{peer}_p90_us": round(deciles[-1], 3)})
    timed = [p for p in case.unfused if row.get(f"{p}_us")]
    forms = [p for p in case.kernel if row.get(f"{p}_us")]
    if timed and forms:
        best, kernel = (min(peers, key=lambda p: row[f"{p}_us"]) for peers in (timed, forms))
        row.update({"kernel": kernel, "kernel_us": row[f"{kernel}_us"], "best_unfused": best,
                    "best_unfused_us": row[f"{best}_us"],
                    "speedup_vs_best_unfused": round(row[f"{best}_us"] / row[f"{kernel}_us"], 3)})
        reference = "nccl_norm" if "nccl_norm" in case.unfused else case.unfused[0]
        if row.get(f"{reference}_us"):
            row["speedup_vs_nccl"] = round(row[f"{reference}_us"] / row[f"{kernel}_us"], 3)
        if row.get("flashinfer_us"):
            row["speedup_vs_flashinfer"] = round(row["flashinfer_us"] / row[f"{kernel}_us"], 3)
    row["errors"] = "; ".join(errors)
    del inputs
    return row


def pays(row: dict) -> bool:
    """The fused kernel is faster than the best unfused pair beyond both spreads (its p90 under their p10)."""
    best, kernel = row.get("best_unfused"), row.get("kernel")
    return bool(best and kernel) and row[f"{kernel}_p90_us"] < row[f"{best}_p10_us"]


def crossovers(rows: list[dict], world: int) -> list[str]:
    """Per op and hidden size: the largest tensor at which the fused op still pays (vLLM's bound beside it)."""
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for hidden in sorted({r["hidden"] for r in rows if r["op"] == op}):
            series = sorted((r for r in rows if r["op"] == op and r["hidden"] == hidden), key=lambda r: r["num_tokens"])
            paying = [r for r in series if pays(r)]
            last = paying[-1] if paying else None
            first_loss = next((r for r in series if last and r["num_tokens"] > last["num_tokens"] and not pays(r)),
                              None)
            text = (f"pays up to {last['tensor_mb']:g} MB ({last['num_tokens']} tokens)" if last else
                    "never pays beyond the spread")
            if first_loss:
                text += f", not at {first_loss['tensor_mb']:g} MB ({first_loss['num_tokens']} tokens)"
            if op.startswith("allreduce"):
                text += "; " + _vllm_bounds(world)
            lines.append(f"crossover {op} H={hidden} TP={world}: {text}")
    return lines


def _vllm_bounds(world: int) -> str:
    """vLLM's hand bounds for this GPU and TP size, to set beside the measured crossover."""
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    cap = 10 * major + minor
    fused = FI_ALLREDUCE_FUSION_MAX_SIZE_MB.get(cap, {}).get(world, "-")
    one_shot = FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB.get(cap, {}).get(world, "-")
    return f"vLLM {VLLM_TABLES} sm{cap} TP={world}: fused up to {fused} MB, one-shot up to {one_shot} MB"


def _line(row: dict) -> str:
    def us(peer):
        return f"{row[f'{peer}_us']:.1f}" if row.get(f"{peer}_us") else "-"

    peers = [p for p in PEERS if f"{p}_us" in row]
    text = " | ".join(f"{p} {us(p)}" for p in peers)
    verdict = (f" -> {row['kernel']} x{row['speedup_vs_best_unfused']} vs {row['best_unfused']}"
               if row.get("best_unfused") else "")
    if row.get("speedup_vs_flashinfer"):
        verdict += f", x{row['speedup_vs_flashinfer']} vs flashinfer"
    kernel = row.get("kernel")
    spread = f" ({kernel} p10-p90 {row[f'{kernel}_p10_us']:.1f}-{row[f'{kernel}_p90_us']:.1f})" if kernel else ""
    errors = f" [errors: {row['errors']}]" if row.get("errors") else ""
    return (f"{row['op']:<36} TP={row['tp']} H={row['hidden']:<5} T={row['num_tokens']:<6} "
            f"{row['tensor_mb']:>8g} MB  {text}{spread}{verdict}{errors}")


def run(world: int, hidden_sizes=DEFAULT_HIDDEN, num_tokens=DEFAULT_TOKENS, names: list[str] | None = None,
        csv_path: Path | None = None, resume: bool = False) -> None:
    """Spawn one process per GPU and run the benchmark (rank 0 prints and writes the CSV). With ``resume``, the rows
    ``csv_path`` already has (an earlier run at this TP size on this GPU type) are kept and not measured again."""
    import torch.multiprocessing as mp

    from .process_group import free_port

    if torch.cuda.device_count() < world:
        raise RuntimeError(f"--tp {world} needs {world} GPUs; this machine shows {torch.cuda.device_count()}")
    earlier = (bench_table.earlier_rows(csv_path, FIELDS, {"device": torch.cuda.get_device_name(0), "tp": world})
               if resume and csv_path else [])
    if earlier:
        print(f"resuming {csv_path}: {len(earlier)} rows kept, measured before", flush=True)
    mp.spawn(measure_rank, args=(world, free_port(), tuple(hidden_sizes), tuple(num_tokens), names,
                                 str(csv_path) if csv_path else None, earlier), nprocs=world, join=True)
