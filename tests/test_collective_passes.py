"""The collective fusions at TP=2 under gloo: two worker processes (no Ray), the tiny model sharded over them,
compiled with and without the pass. Checks the match count per layer, that the fused model's output agrees with
the unfused one (the correctness gate), and the num_tokens range the threshold sets."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from fusiontune.harness.model import build_model_config
from fusiontune.harness.worker import Job, free_port

OFF = {"fuse_norm_quant": False, "fuse_act_quant": False, "fuse_allreduce_rms": False}


def _rank(rank, port, queue, jobs):
    from fusiontune.harness.worker import TPWorker

    worker = TPWorker(rank, 2, num_threads=1, device="cpu")
    worker.init_process_group(f"tcp://127.0.0.1:{port}")
    try:
        queue.put((rank, [worker.run(job) for job in jobs]))
    finally:
        worker.shutdown()


def run_tp2(jobs: list[Job]) -> dict[int, list]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, queue, jobs)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.fixture(scope="module")
def allreduce_runs():
    """fp8-static tiny model, 2 layers: baseline, all-reduce + norm fusion (with norm+quant), and a threshold so
    small that only num_tokens 1-4 fall in the fusion's range (1 MB / (256 x 2 bytes) would be 2048)."""
    cfg = build_model_config("tiny", num_layers=2, quant="fp8-static").to_dict()
    sizes = [3, 9]
    fused = {"fuse_norm_quant": True, "fuse_allreduce_rms": True, "fi_allreduce_fusion_max_size_mb": 1}
    small = {**fused, "fi_allreduce_fusion_max_size_mb": 4 * 256 * 2 / 2**20}
    jobs = [Job("base", OFF, 2, cfg, sizes, warmup=1, repeats=2, is_baseline=True),
            Job("fused", fused, 2, cfg, sizes, warmup=1, repeats=2),
            Job("small", small, 2, cfg, sizes, warmup=1, repeats=2)]
    return run_tp2(jobs)


def test_allreduce_norm_fuses_twice_per_layer_and_agrees(allreduce_runs):
    for rank, (base, fused, _) in allreduce_runs.items():
        for b, f in zip(base, fused):
            assert not b.error and not f.error, (rank, b.error, f.error)
            # Each layer all-reduces after o_proj (-> post-attention norm) and after down_proj (-> next norm).
            assert f.matches["fuse_allreduce_rms"] == 2 * 2
            assert f.matches["fuse_norm_quant"] == 2 * 2  # both norms of a layer feed a quant (the final one none)
            assert f.max_abs_err <= f.tolerance


def test_the_threshold_sets_the_range(allreduce_runs):
    for rank, (_, _, small) in allreduce_runs.items():
        by_size = {r.num_tokens: r for r in small}
        assert by_size[3].compile_range == "1-4" and by_size[3].matches["fuse_allreduce_rms"] == 4
        assert by_size[9].compile_range == ">=5" and by_size[9].matches["fuse_allreduce_rms"] == 0
        assert "fuse_allreduce_rms" not in by_size[9].active
        assert all(not r.error and r.max_abs_err <= r.tolerance for r in small)
