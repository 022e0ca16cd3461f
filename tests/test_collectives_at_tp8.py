"""The collective ops at TP=8 under gloo (issue 17 without 8 GPUs): eight processes, each op's CPU form (its
reference: the unfused decomposition) against the same computation done whole in one process, on inputs every
rank builds alike (odd widths, rows that split over 8). The all-reduce sums fp32 in gloo's order, so sums are held
to fp32 rounding over eight terms; every op built on that all-reduce must then equal, bit for bit, its chain run
on the same all-reduce's result.

Then sweeps/tp8-cpu.yaml end to end through Ray: each collective fusion alone at TP=8, firing where its range
says and agreeing with all-off. The TP=8 plans of the multi-GPU sweeps are checked in test_sweep.py; the Triton
kernel's eight simulated ranks in test_allreduce_rms_kernel.py.
"""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from fusiontune.harness.process_group import free_port

pytestmark = pytest.mark.slow  # every test here starts several processes
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


@pytest.mark.xdist_group("ray")  # one Ray at a time: tests/conftest.py
def test_the_tp8_cpu_sweep_fires_each_collective_fusion_and_agrees(tmp_path):
    done = subprocess.run(["fusiontune", "run", "sweeps/tp8-cpu.yaml", "--out", str(tmp_path / "run"), "--no-report"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert (table["status"] == "ok").all() and (table["tp"] == 8).all()
    assert (table["max_abs_err"] <= table["tolerance"]).all()
    rows = {(label, n): row for label, n, row in zip(table["label"], table["num_tokens"], table.itertuples())}
    fused = [rows[("fuse_allreduce_rms=on", n)] for n in (3, 16)]
    assert [r.matches_fuse_allreduce_rms for r in fused] == [2, 2]  # after o_proj and after down_proj
    for label in ("enable_sp=on", "enable_sp=on fuse_gemm_comms=on"):
        three, sixteen = rows[(label, 3)], rows[(label, 16)]
        assert three.compile_range == "1-7" and three.matches_enable_sp == 0  # below SP's start
        assert sixteen.compile_range == ">=8" and sixteen.matches_enable_sp == 2
    # GEMM -> reduce-scatter after o_proj and down_proj; all-gather -> GEMM into gate_up (the layer's input is
    # not yet sharded: SP starts at its first all-reduce)
    assert rows[("enable_sp=on fuse_gemm_comms=on", 16)].matches_fuse_gemm_comms == 2 + 1
    assert rows[("enable_sp=on", 16)].matches_fuse_gemm_comms == 0
