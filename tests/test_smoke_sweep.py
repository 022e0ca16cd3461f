"""The smoke sweep end to end, as a user runs it: the CLI, a local Ray, TP=1 and TP=2 (gloo), results, profiles,
logs, report; then an interrupted run finished with --resume. Minutes on 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time: tests/conftest.py
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
    assert len(table) == 10 * 3 and set(table["tp"]) == {1, 2} and set(table["num_tokens"]) == {1, 16, 128}
    assert (table["status"] == "ok").all(), table[["label", "tp", "num_tokens", "error"]]
    layers = int(table["model_num_layers"].iloc[0])
    for flag, per_layer in (("fuse_norm_quant", 2), ("fuse_act_quant", 1)):
        enabled = table[flag].astype(bool)
        assert (table.loc[enabled, f"matches_{flag}"] == per_layer * layers).all()
        assert (table.loc[~enabled, f"matches_{flag}"] == 0).all()
    assert (table["max_abs_err"] <= table["tolerance"]).all()
    assert (table["latency_ms_p10"] <= table["latency_ms"]).all() and (table["latency_ms"] <= table["latency_ms_p90"]).all()
    # measure.paired (the default): every config but all-off's first measurement timed in rounds with all-off
    # (at least 6 rounds of 5, batches of 6 up to 60 repeats), settled by its speedup's interval; all-off's first
    # alone, in batches of 20, settled by its latency's
    paired = table["paired_speedup"].notna()
    assert (paired == ~table["is_baseline"]).all()
    assert table.loc[paired, "repeats"].isin([30, 60]).all() and (table.loc[paired, "paired_rounds"] >= 6).all()
    assert table.loc[~paired, "repeats"].isin([20, 40, 60]).all()
    alone = table[~paired & table["settled"]]
    assert (alone["latency_ms_ci_high"] - alone["latency_ms_ci_low"] <= 2 * 0.005 * alone["latency_ms"]).all()
    settled = table[paired & table["settled"]]
    assert (settled["paired_ci_high"] - settled["paired_ci_low"] <= 2 * 0.005 * settled["paired_speedup"]).all()
    again = table[table["baseline_repeat"]]
    assert len(again) == 6 and (again["max_abs_err"] == 0).all()  # the same forward twice: bit-identical
    for column in ("fuse_allreduce_rms", "sp_min_token_num", "fi_allreduce_fusion_max_size_mb", "error", "allreduce",
                   "allreduce_backend"):
        assert column in table
    # what ran: gloo's all-reduce at TP=2, no collective at TP=1
    assert set(table.loc[table["tp"] == 2, "allreduce_used"]) == {"gloo"}
    assert set(table.loc[table["tp"] == 1, "allreduce_used"]) == {""}
    assert "TP=2 fuse_norm_quant=on fuse_act_quant=on: ok" in log


def test_rows_log_manifest_and_report(smoke_run):
    out, _ = smoke_run
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert "name: smoke-cpu" in manifest["sweep"] and manifest["software"]["torch"] and manifest["finished"]
    assert manifest["cluster_resources"]["CPU"] >= 2 and set(manifest["devices"]) == {"1", "2"}
    assert all(d.startswith("cpu") for d in manifest["devices"]["2"])
    report = (out / "report.md").read_text()
    assert "## TP=1" in report and "## TP=2" in report and "fuse_norm_quant=4, fuse_act_quant=2" in report
    assert "did not fire" not in report
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "Noise floor (all-off measured first and again last)" in report and "## Where the time goes" in report


def test_profiles_file_kernels_by_what_they_do_and_keep_traces_and_logs(smoke_run):
    out, _ = smoke_run
    table = pd.read_parquet(out / "results.parquet")
    kernels = pd.read_parquet(out / "kernels.parquet")
    fused = table[table["fuse_norm_quant"].astype(bool) & table["fuse_act_quant"].astype(bool)]
    for config_id, tp in fused[["config_id", "tp"]].drop_duplicates().itertuples(index=False):
        here = kernels[(kernels["config_id"] == config_id) & (kernels["tp"] == tp)]
        assert {"fused rms+quant", "fused act+quant", "gemm", "attention"} <= set(here["category"])
        assert set(here["rank"]) == set(range(tp)) and set(here["num_tokens"]) == {1, 16, 128}
        # The aten ops a fusiontune op runs inside it (its reference, on CPU) are filed under that op's category.
        inner = here[here["op"].str.startswith("fusiontune::") & here["kernel"].str.startswith("aten::")]
        assert len(inner) and (inner["category"] != "other").all()
        assert set(inner.loc[inner["op"].str.contains("rms_norm_quant"), "category"]) == {"fused rms+quant"}
    base = kernels[kernels["config_id"].isin(table.loc[table["is_baseline"], "config_id"])]
    assert {"rms_norm", "quant", "activation"} <= set(base["category"])
    assert not {"fused rms+quant", "fused act+quant"} & set(base["category"])
    assert "collective" in set(base.loc[base["tp"] == 2, "category"])
    traces = sorted(p.name for p in (out / "traces").iterdir())
    assert len(traces) == 10 * 3 and all(name.endswith(".json.gz") for name in traces)
    import gzip

    trace = json.loads(gzip.decompress((out / "traces" / traces[0]).read_bytes()))
    assert any(e.get("name", "").startswith("fusiontune::") for e in trace["traceEvents"])
    logs = sorted((out / "logs").iterdir())
    assert len(logs) == 4  # per TP size: all-off's, and the batch the rest were timed in together
    tp2_log = next(p for p in logs if p.name.startswith("tp2-together-")).read_text()
    assert "rank 0:" in tp2_log and "rank 1:" in tp2_log and "num_tokens=128: range" in tp2_log
    assert "4 configs timed together" in tp2_log and "in rounds with all-off (4 configs)" in tp2_log


def test_an_interrupted_run_resumes_without_repeating_or_duplicating(smoke_run, tmp_path):
    out, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    lines = (run / "rows.jsonl").read_text().splitlines()
    # Killed after TP=1 (15 rows), TP=2's baseline and three configs' largest size (the batch streams its rows
    # size by size), half-way through writing the fourth config's. (Cut in TP=2, so only TP=2 runs again.)
    (run / "rows.jsonl").write_text("\n".join(lines[:21]) + '\n{"config_id": "torn')
    partial = {json.loads(line)["config_id"] for line in lines[18:21]}
    assert {(json.loads(line)["tp"], json.loads(line)["num_tokens"]) for line in lines[18:21]} == {(2, 128)}
    assert len(partial) == 3 and {json.loads(line)["tp"] for line in lines[:15]} == {1}
    log = " ".join(fusiontune("run", SWEEP, "--out", str(run), "--resume", "--no-report").split())
    assert "its last row was cut short (a crash mid-write); it is dropped and its config runs again" in log
    # TP=2 recomputes its baseline's outputs to check the rest against, untimed and without rows; the three
    # configs measured at 128 tokens measure 1 and 16 only.
    assert ("6 configs already measured, 4 to run (3 of them only at the sizes they lack) (and the all-off "
            "outputs recomputed") in log
    table = pd.read_parquet(run / "results.parquet")
    assert len(table) == 30 and not table.duplicated(["config_id", "tp", "num_tokens"]).any()
    assert (table["status"] == "ok").all()
    journal = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    assert len(journal) == 30  # the torn line is gone; no (config, size) is measured twice
    assert len({(r["config_id"], r["tp"], r["num_tokens"]) for r in journal}) == 30
    assert {r["num_tokens"] for r in journal[21:] if r["config_id"] in partial} == {1, 16}
    nothing_left = fusiontune("run", SWEEP, "--out", str(run), "--resume", "--dry-run")
    assert "10 configs already measured, 0 to run" in nothing_left


def test_the_analysis_notebook_runs_on_the_smoke_results(smoke_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out, _ = smoke_run
    notebook = nbformat.read("notebooks/analysis.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # kept clean in git
    monkeypatch.setenv("FUSIONTUNE_RUN", str(out))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": "notebooks"}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{out}: 30 rows, 10 configs, TP sizes [1, 2]" in text
    assert sum(o.output_type == "display_data" and "image/png" in o.data for o in outputs) >= 2  # the two plots
