"""The TP worker in-process (no Ray): compiled model per quant scheme, match counts per layer, agreement with the
all-off compile, and failures recorded per num_tokens instead of raised."""

from __future__ import annotations

import pytest

from fusiontune.harness.presets import build_model_config
from fusiontune.harness.roles import Role
from fusiontune.harness.jobs import Job
from fusiontune.harness.worker import TPWorker
from fusiontune.kernels.linear import REFERENCE_GEMM

ON = {"fuse_norm_quant": True, "fuse_act_quant": True}
OFF = {"fuse_norm_quant": False, "fuse_act_quant": False}


@pytest.fixture(scope="module")
def worker():
    return TPWorker(0, 1)


def run_pair(worker, num_tokens, **model):
    cfg = build_model_config("tiny", **model).to_dict()
    base = worker.run(Job("base", OFF, 2, cfg, num_tokens, warmup=1, repeats=3, role=Role.BASELINE))
    fused = worker.run(Job("fused", ON, 2, cfg, num_tokens, warmup=1, repeats=3))
    return cfg, base, fused


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, norm_per_layer, act_per_layer",
    [
        # Per-token: every norm -> quant fuses; silu -> per-token quant has no fused op.
        ({"quant": "fp8-per-token"}, 2, 0),
        # Per-group 64 with Qwen3-style Q/K norm: the per-head norms feed RoPE, not a quant, and stay unfused.
        ({"quant": "fp8-per-group", "group_size": 64, "qk_norm": True, "num_layers": 3}, 2, 1),
    ],
    ids=["per-token", "per-group-qk-norm"],
)
def test_compiled_model_fuses_per_layer_and_agrees_with_all_off(worker, model, norm_per_layer, act_per_layer):
    cfg, base, fused = run_pair(worker, [1, 7], **model)
    layers = cfg["num_layers"]
    for b, f in zip(base, fused):
        assert not b.error and not f.error, (b.error, f.error)
        assert b.matches["fuse_norm_quant"] == 0 and b.matches["fuse_act_quant"] == 0
        assert f.matches["fuse_norm_quant"] == norm_per_layer * layers
        assert f.matches["fuse_act_quant"] == act_per_layer * layers
        assert f.max_abs_err <= f.tolerance
        assert len(f.times_ms) == 3 and all(t > 0 for t in f.times_ms) and f.timing == "wall clock"
        # each size says which FP8 GEMM its linear layers ran: on a CPU, the fp32 reference
        assert b.gemm_used == f.gemm_used == REFERENCE_GEMM


@pytest.mark.slow
def test_a_paired_job_times_the_config_in_rounds_with_all_off(worker):
    """measure.paired: the config's job compiles all-off beside it (the same model, the same weights) and times the
    two in alternating rounds; the config still fuses and agrees with all-off."""
    cfg = build_model_config("tiny", quant="fp8-static", num_layers=1).to_dict()
    worker.run(Job("base", OFF, 2, cfg, [1, 8], warmup=1, repeats=3, role=Role.BASELINE))
    fused = worker.run(Job("fused", ON, 2, cfg, [1, 8], warmup=1, repeats=10, max_repeats=10, paired_with=OFF))
    for r in fused:
        assert not r.error and r.matches["fuse_norm_quant"] == 2 and r.max_abs_err <= r.tolerance, r.error
        assert len(r.times_ms) == len(r.paired_base_ms) == 30  # 6 rounds of 5 each, the fewest
        assert r.timing == "paired rounds of 5 with all-off, wall clock"


@pytest.mark.slow
def test_a_size_beyond_max_position_fails_alone(worker):
    _, base, fused = run_pair(worker, [5, 300], quant="fp8-static", max_position=256, num_layers=1)
    by_size = {r.num_tokens: r for r in fused}
    assert not by_size[5].error and by_size[5].matches["fuse_norm_quant"] == 2
    assert "num_tokens=300 exceeds the model's max_position=256" in by_size[300].error
    assert not by_size[300].times_ms


@pytest.mark.slow
def test_a_config_that_cannot_resolve_fails_every_size(worker):
    cfg = build_model_config("tiny", num_layers=1).to_dict()
    results = worker.run(Job("bad", {"enable_sp": True}, 2, cfg, [1, 4]))
    assert [r.num_tokens for r in results] == [1, 4]
    assert all("PassConfigError" in r.error and "sp_min_token_num" in r.error for r in results)


@pytest.mark.slow
def test_each_num_tokens_range_runs_its_own_compile(worker, monkeypatch):
    """Two ranges split at 8, the Q/K-norm + RoPE fusion only in the lower one (as a "low" pass with a bound
    would be): each size runs its range's graph, with that range's passes, and both agree with all-off."""
    from fusiontune.harness import worker as worker_module
    from fusiontune.passes.ranges import CompileRange

    def split_at_8(config):
        return [CompileRange(1, 8, config),
                CompileRange(9, None, config.switched_off({"enable_qk_norm_rope_fusion"}, "outside (test)"))]

    monkeypatch.setattr(worker_module, "compile_ranges", split_at_8)
    cfg = build_model_config("tiny", qk_norm=True, num_layers=2).to_dict()
    off = {**OFF, "enable_qk_norm_rope_fusion": False}
    worker.run(Job("base", off, 2, cfg, [4, 16], warmup=1, repeats=2, role=Role.BASELINE))
    fused = {r.num_tokens: r for r in worker.run(Job("qk", {"enable_qk_norm_rope_fusion": True}, 2, cfg, [4, 16],
                                                     warmup=1, repeats=2))}
    low, high = fused[4], fused[16]
    assert not low.error and not high.error, (low.error, high.error)
    assert low.compile_range == "1-8" and "enable_qk_norm_rope_fusion" in low.active
    assert low.matches["enable_qk_norm_rope_fusion"] == 2
    assert high.compile_range == ">=9" and "enable_qk_norm_rope_fusion" not in high.active
    assert high.matches["enable_qk_norm_rope_fusion"] == 0
    assert low.max_abs_err <= low.tolerance and high.max_abs_err <= high.tolerance


@pytest.mark.slow
def test_a_graph_from_inductors_cache_keeps_its_match_counts(worker, tmp_path, monkeypatch):
    """The second run of a config is served from Inductor's cache (its post-grad passes do not run): the counts
    come from the record its first compile left, and without that record the range is compiled afresh."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = build_model_config("tiny", quant="fp8-static", num_layers=1).to_dict()
    worker.run(Job("base", OFF, 2, cfg, [1, 6], warmup=1, repeats=2, role=Role.BASELINE))
    first = worker.run(Job("fused", ON, 2, cfg, [1, 6], warmup=1, repeats=2))
    again = worker.run(Job("fused", ON, 2, cfg, [1, 6], warmup=1, repeats=2))
    assert "graph from Inductor's cache" in worker.job_log()
    for a, b in zip(first, again):
        assert not a.error and not b.error and a.matches == b.matches and a.matches["fuse_norm_quant"] == 2
        assert b.max_abs_err == a.max_abs_err <= a.tolerance  # the cached graph computes what the fresh one did
    records = list((tmp_path / "fusiontune-match-counts").iterdir())
    for record in records:
        record.unlink()
    lost = worker.run(Job("fused", ON, 2, cfg, [1, 6], warmup=1, repeats=2))
    assert "no match counts were recorded" in worker.job_log() and "compiling range >=1 without the cache" in \
        worker.job_log()
    assert all(not r.error and r.matches["fuse_norm_quant"] == 2 for r in lost)
    uncached = worker.run(Job("fused", ON, 2, cfg, [1, 6], warmup=1, repeats=2, compile_cache=False))
    assert "Inductor's cache" not in worker.job_log()
    assert all(not r.error and r.matches["fuse_norm_quant"] == 2 for r in uncached)


def test_match_counts_wait_for_a_sibling_rank_to_save_them(tmp_path, monkeypatch):
    """Two ranks compile the same graph at once: one compiles it, the other gets it from Inductor's cache a moment
    before the first has saved its match counts. The second waits for them instead of recompiling alone."""
    import threading

    from fusiontune.harness.match_counts import MatchCounts, UnrecordedCacheHit

    counts = MatchCounts.__new__(MatchCounts)
    counts.path = tmp_path / "counts.json"
    with pytest.raises(UnrecordedCacheHit):
        counts.load()
    writer = threading.Timer(0.3, lambda: counts.save({"fuse_norm_quant": 2}))
    writer.start()
    assert counts.load(wait_s=10) == {"fuse_norm_quant": 2}
    writer.join()


def _agree(rank, port, queue):
    worker = TPWorker(rank, 2, num_threads=1, device="cpu")
    worker.init_process_group(f"tcp://127.0.0.1:{port}")
    try:
        queue.put((rank, worker.place.any_rank(rank == 1), worker.place.any_rank(False)))
    finally:
        worker.shutdown()


@pytest.mark.slow
def test_a_cache_miss_on_one_rank_is_every_ranks():
    """The recompile after a cached graph without counts is decided by the group: a rank that decided alone
    would run other collectives than its peer, and both would hang (seen once in CI at TP=2)."""
    import multiprocessing as mp

    from fusiontune.harness.process_group import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_agree, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, False), (1, True, False)]
