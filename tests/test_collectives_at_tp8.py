"""The collective ops at TP=8 under gloo (issue 17 without 8 GPUs): eight processes, each op's CPU form (its
reference: the unfused decomposition) against the same computation done whole in one process, on inputs every
rank builds alike (odd widths, rows that split over 8). The all-reduce sums fp32 in gloo's order, so sums are held
to fp32 rounding over eight terms; every op built on that all-reduce must then equal, bit for bit, its chain run
on the same all-reduce's result.

The TP=8 plans of the multi-GPU sweeps are checked in test_sweep.py; the Triton kernel's eight simulated ranks in
test_allreduce_norm_kernel.py.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from fusiontune.harness.worker import free_port

WORLD = 8
ROWS, HIDDEN, COLUMNS = 24, 40, 24  # rows split over 8; widths no power of two
EPS = 1e-6


def _inputs():
    g = torch.Generator().manual_seed(8)
    parts = [torch.randn(ROWS, HIDDEN, generator=g) for _ in range(WORLD)]
    residual = torch.randn(ROWS, HIDDEN, generator=g)
    weight = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    b = torch.randn(HIDDEN, COLUMNS, generator=g) / HIDDEN ** 0.5
    return parts, residual, weight, b


def _rank(rank, port, queue):
    import torch.distributed as dist

    from fusiontune.kernels import numerics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD.group_name
    ops = torch.ops.fusiontune
    failures = []

    def expect(condition, what):
        if not condition:
            failures.append(f"rank {rank}: {what}")

    try:
        parts, residual, weight, b = _inputs()
        mine = parts[rank]
        whole = torch.stack(parts).sum(0)
        # fp32 sums of 8 terms in any order: within 8 roundings of the terms' magnitudes
        bound = WORLD * torch.finfo(torch.float32).eps * torch.stack(parts).abs().sum(0)

        reduced = ops.all_reduce(mine, group)
        expect(((reduced - whole).abs() <= bound).all(), "all_reduce is off the whole sum")
        expect(torch.equal(ops.reduce_scatter(mine, group), reduced.chunk(WORLD)[rank]),
               "reduce_scatter is not this rank's rows of the all-reduce")
        expect(torch.equal(ops.shard_rows(residual, group), residual.chunk(WORLD)[rank]), "shard_rows")
        shards = [p.chunk(WORLD)[r] for r, p in enumerate(parts)]
        expect(torch.equal(ops.all_gather(shards[rank], ROWS, group), torch.cat(shards)), "all_gather")
        codes = [numerics.quant_fp8_static(shard, torch.tensor([0.05])) for shard in shards]
        expect(torch.equal(ops.all_gather(codes[rank], ROWS, group).view(torch.uint8),
                           torch.cat(codes).view(torch.uint8)), "all_gather of FP8 codes")

        # the fused all-reduce + add + RMSNorm (+ FP8 static quant): the chain on the all-reduce's result
        new_residual = numerics.residual_add(reduced, residual)
        normed = numerics.rms_norm(new_residual, weight, EPS)
        res = residual.clone()
        expect(torch.equal(ops.all_reduce_fused_add_rms_norm(mine, res, weight, EPS, group), normed),
               "all_reduce_fused_add_rms_norm output")
        expect(torch.equal(res, new_residual), "all_reduce_fused_add_rms_norm residual")
        scale = torch.tensor([0.02])
        res = residual.clone()
        codes = ops.all_reduce_fused_add_rms_norm_quant_fp8_static(mine, res, weight, EPS, scale, group)
        expect(torch.equal(codes.view(torch.uint8), numerics.quant_fp8_static(normed, scale).view(torch.uint8)),
               "all_reduce_fused_add_rms_norm_quant_fp8_static codes")

        # AsyncTP's GEMM + collective ops: their decompositions, and the whole product
        product = ops.matmul_reduce_scatter(mine, b, group)
        expect(torch.equal(product, ops.reduce_scatter(mine @ b, group)), "matmul_reduce_scatter decomposition")
        # a dot of HIDDEN terms per rank, then WORLD partial products summed: that many roundings at most
        product_bound = (HIDDEN + WORLD) * torch.finfo(torch.float32).eps * (torch.stack(parts).abs().sum(0) @ b.abs())
        expect(((product - (whole @ b).chunk(WORLD)[rank]).abs() <= product_bound.chunk(WORLD)[rank]).all(),
               "matmul_reduce_scatter is off the whole product")
        gathered = ops.all_gather_matmul(shards[rank], b, ROWS, group)
        expect(torch.equal(gathered, torch.cat(shards) @ b), "all_gather_matmul")
    except Exception as exc:  # noqa: BLE001 - reported to the test, not lost in a child process
        failures.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    queue.put((rank, failures))
    dist.destroy_process_group()


def test_collective_ops_at_tp8_under_gloo():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert sorted(results) == list(range(WORLD))
    failures = [f for rank in sorted(results) for f in results[rank]]
    assert not failures, "\n".join(failures[:20])
