"""The collective fusions at TP=2 under gloo: two worker processes (no Ray), the tiny model sharded over them,
compiled with and without the pass. Checks the match count per layer, that the fused model's output agrees with
the unfused one (the correctness gate), and the num_tokens range the threshold sets."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from fusiontune.harness.presets import build_model_config
from fusiontune.harness.roles import Role
from fusiontune.harness.jobs import Job
from fusiontune.harness.process_group import free_port

pytestmark = pytest.mark.slow  # every test here compiles the model in two processes
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
    jobs = [Job("base", OFF, 2, cfg, sizes, warmup=1, repeats=2, role=Role.BASELINE),
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


@pytest.fixture(scope="module", params=["none", "fp8-static"])
def sp_runs(request):
    """Sequence parallelism alone and with AsyncTP, from num_tokens 4 (sp_min_token_num); 9 does not split over
    TP=2. bf16 exercises the aten.mm forms, fp8-static the scaled_mm forms and a norm fused with its quant."""
    quant = request.param
    cfg = build_model_config("tiny", num_layers=2, quant=quant).to_dict()
    sizes = [3, 8, 9]
    sp = {"enable_sp": True, "sp_min_token_num": 4, "fuse_norm_quant": quant != "none"}
    jobs = [Job("base", OFF, 2, cfg, sizes, warmup=1, repeats=2, role=Role.BASELINE),
            Job("sp", {**sp, "fuse_gemm_comms": False}, 2, cfg, sizes, warmup=1, repeats=2),
            Job("asynctp", {**sp, "fuse_gemm_comms": True}, 2, cfg, sizes, warmup=1, repeats=2)]
    return run_tp2(jobs)


def test_sequence_parallelism_and_asynctp_match_per_layer_and_agree(sp_runs):
    for rank, (base, sp, asynctp) in sp_runs.items():
        for runs in (sp, asynctp):
            by_size = {r.num_tokens: r for r in runs}
            for r in runs:
                assert not r.error, (rank, r.num_tokens, r.error)
                assert r.max_abs_err <= r.tolerance, (rank, r.num_tokens, r.max_abs_err)
            # Per layer: the post-attention norm and the next layer's input norm (the last: the final norm).
            assert by_size[8].matches["enable_sp"] == 2 * 2 and by_size[8].compile_range == ">=4"
            assert by_size[3].matches["enable_sp"] == 0 and "enable_sp" not in by_size[3].active
        by_size = {r.num_tokens: r for r in asynctp}
        # GEMM -> reduce-scatter: o_proj and down_proj of each layer (4); all-gather -> GEMM: every gathered norm
        # output but the final one feeds a GEMM (3).
        assert by_size[8].matches["fuse_gemm_comms"] == 4 + 3
        assert {r.num_tokens: r.matches["fuse_gemm_comms"] for r in sp} == {3: 0, 8: 0, 9: 0}


def test_sizes_that_do_not_split_over_tp_run_without_sp(sp_runs):
    for _, (_, sp, asynctp) in sp_runs.items():
        for runs in (sp, asynctp):
            nine = next(r for r in runs if r.num_tokens == 9)
            assert nine.compile_range == ">=4/indivisible"
            assert nine.matches["enable_sp"] == 0 and nine.matches["fuse_gemm_comms"] == 0
            assert "enable_sp" not in nine.active and "fuse_gemm_comms" not in nine.active
            assert nine.max_abs_err <= nine.tolerance
