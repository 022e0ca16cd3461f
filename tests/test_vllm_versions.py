"""Exports fit the vLLM a user names: no field that release refuses, and where it cannot run the tuned pick, the
best measured config it can run with what that costs (or a refusal naming the way out). Checked on the committed
TP=2 tune, whose pick turns on sequence parallelism and AsyncTP (gone since vLLM 0.32)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from fusiontune.harness.export import ExportError, export_tuned, flags_for
from fusiontune.passes.config import PassConfig
from fusiontune.passes.vllm_versions import NEWEST, RELEASES, SEQUENCE_PARALLEL_FIELDS, fit, release

TUNE = "results/tune-multi-gpu-llama8b-bf16"


def test_releases_and_their_fields():
    assert release("0.33.1") is release("v0.33") is RELEASES["0.33"] and NEWEST == "0.33"
    assert release("0.31").removed == frozenset() and release("0.32").removed == SEQUENCE_PARALLEL_FIELDS
    assert SEQUENCE_PARALLEL_FIELDS <= set(PassConfig.model_fields)  # removed fields are fields we implement
    with pytest.raises(ValueError, match="vLLM version '0.9' is not known here; known: 0.31, 0.32, 0.33"):
        release("0.9")
    # an off flag the release removed is dropped without loss; an on flag cannot be expressed
    assert fit({"enable_sp": False, "fuse_gemm_comms": False, "fuse_allreduce_rms": True}, "0.33") == (
        {"fuse_allreduce_rms": True}, [])
    assert fit({"enable_sp": True, "sp_min_token_num": 4096}, "0.32")[1] == ["enable_sp"]
    assert fit({"enable_sp": True, "sp_min_token_num": 4096}, "0.31") == ({"enable_sp": True,
                                                                           "sp_min_token_num": 4096}, [])


@pytest.fixture
def tune_run(tmp_path):
    run = tmp_path / "tune-multi-gpu-llama8b-bf16"
    shutil.copytree(TUNE, run)
    return run


def test_a_pick_the_release_cannot_run_is_refused_when_nothing_else_was_measured(tune_run, tmp_path):
    with pytest.raises(ExportError, match=r"vLLM 0.33 cannot run the tuned pick: it turns on enable_sp, "
                                          r"fuse_gemm_comms .* \(--vllm-version 0.31\)"):
        export_tuned(tune_run, tmp_path / "thresholds")
    assert not (tmp_path / "thresholds").exists()
    path = export_tuned(tune_run, tmp_path / "thresholds", vllm_version="0.31")
    data = json.loads(path.read_text())
    assert data["vllm"]["version"] == "0.31" and data["pass_config"]["enable_sp"] is True
    assert "-cc.pass_config.sp_min_token_num=4096" in flags_for(data, path, "0.31")
    with pytest.raises(ExportError, match="which vLLM 0.32 cannot run"):
        flags_for(data, path, "0.32")


def test_the_best_config_the_release_can_run_is_exported_with_its_cost(tune_run, tmp_path):
    """A config without SP measured at every size (here: the all-off rows, relabelled, 5% faster) is what a vLLM
    0.33 deployment gets; the file says what the tuned pick would have given."""
    table = pd.read_parquet(tune_run / "results.parquet")
    base = table[table["is_baseline"].astype(bool) & ~table["baseline_repeat"].astype(bool)].copy()
    base["config_id"], base["label"], base["is_baseline"] = "fused-only", "fuse_allreduce_rms=on", False
    base["fuse_allreduce_rms"], base["enable_sp"], base["fuse_gemm_comms"] = True, False, False
    base["fi_allreduce_fusion_max_size_mb"] = 64.0
    base["latency_ms"] = base["latency_ms"] * 0.98
    pd.concat([table, base], ignore_index=True).to_parquet(tune_run / "results.parquet")
    path = export_tuned(tune_run, tmp_path / "thresholds")
    data = json.loads(path.read_text())
    assert data["vllm"]["version"] == NEWEST
    assert not set(data["pass_config"]) & release(NEWEST).removed  # nothing vLLM 0.33 refuses
    assert not any("enable_sp" in flag or "gemm_comms" in flag for flag in data["vllm"]["flags"].split())
    assert data["pass_config"]["fuse_allreduce_rms"] is True and data["evidence"]["source"].endswith("fused-only")
    cannot = data["vllm"]["cannot_run"]
    assert cannot["fusions"] == ["enable_sp", "fuse_gemm_comms"]
    assert data["evidence"]["expected_speedup"] == pytest.approx(1 / 0.98)
    assert cannot["tuned_expected_speedup"] > cannot["expected_speedup"] and "more expected forward time" in \
        cannot["cost"]
