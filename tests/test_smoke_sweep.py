"""The smoke sweep end to end, as a user runs it: the CLI, a local Ray, TP=1 and TP=2 (gloo), results, report;
then an interrupted run finished with --resume. Minutes on 2 cores: the one place the suite starts Ray."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
SWEEP = "sweeps/smoke-cpu.yaml"


def fusiontune(*args, cwd=None):
    result = subprocess.run(["fusiontune", *args], capture_output=True, text=True, timeout=1200, cwd=cwd,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    log = fusiontune("run", SWEEP, "--out", str(out))
    return out, log


def test_every_config_ran_fused_and_agreed_with_all_off(smoke_run):
    out, log = smoke_run
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 8 * 3 and set(table["tp"]) == {1, 2} and set(table["num_tokens"]) == {1, 16, 128}
    assert (table["status"] == "ok").all(), table[["label", "tp", "num_tokens", "error"]]
    layers = int(table["model_num_layers"].iloc[0])
    for flag, per_layer in (("fuse_norm_quant", 2), ("fuse_act_quant", 1)):
        enabled = table[flag].astype(bool)
        assert (table.loc[enabled, f"matches_{flag}"] == per_layer * layers).all()
        assert (table.loc[~enabled, f"matches_{flag}"] == 0).all()
    assert (table["max_abs_err"] <= table["tolerance"]).all()
    assert (table["latency_ms_p10"] <= table["latency_ms"]).all() and (table["latency_ms"] <= table["latency_ms_p90"]).all()
    assert (table["repeats"] == 20).all()
    for column in ("fuse_allreduce_rms", "sp_min_token_num", "fi_allreduce_fusion_max_size_mb", "error"):
        assert column in table
    assert "TP=2 fuse_norm_quant=on fuse_act_quant=on: ok" in log


def test_rows_log_manifest_and_report(smoke_run):
    out, _ = smoke_run
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    manifest = json.loads((out / "manifest.json").read_text())
    assert "name: smoke-cpu" in manifest["sweep"] and manifest["software"]["torch"] and manifest["finished"]
    assert manifest["cluster_resources"]["CPU"] >= 2 and set(manifest["devices"]) == {"1", "2"}
    assert all(d.startswith("cpu") for d in manifest["devices"]["2"])
    report = (out / "report.md").read_text()
    assert "## TP=1" in report and "## TP=2" in report and "fuse_norm_quant=4, fuse_act_quant=2" in report
    assert "did not fire" not in report
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_resumes_without_repeating_or_duplicating(smoke_run, tmp_path):
    out, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    lines = (run / "rows.jsonl").read_text().splitlines()
    # Killed after TP=1's baseline and first config, half-way through writing the next row.
    (run / "rows.jsonl").write_text("\n".join(lines[:6]) + '\n{"config_id": "torn')
    first_two = {json.loads(line)["config_id"] for line in lines[:6]}
    log = fusiontune("run", SWEEP, "--out", str(run), "--resume", "--no-report")
    assert "2 configs already measured, 7 to run" in log  # TP=1 re-measures its baseline; 2 + 4 left + baseline
    table = pd.read_parquet(run / "results.parquet")
    assert len(table) == 24 and not table.duplicated(["config_id", "tp", "num_tokens"]).any()
    assert (table["status"] == "ok").all()
    resumed = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()[7:]]
    rerun_ids = {r["config_id"] for r in resumed}
    assert not (first_two - {table.loc[table["is_baseline"] & (table["tp"] == 1), "config_id"].iloc[0]}) & rerun_ids
    nothing_left = fusiontune("run", SWEEP, "--out", str(run), "--resume", "--dry-run")
    assert "8 configs already measured, 0 to run" in nothing_left
