"""The run folder keeps every row through crashes, resumes and new runs (issue 20's "nothing lost")."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from fusiontune.cli import app
from fusiontune.harness.launcher import OtherMachine, check_same_machine
from fusiontune.harness.results import RESUMABLE_SKIP, RunFolder, completed_configs, measured_sizes, torn_tail


def rows(config_id, sizes, status="ok", tp=1, error=""):
    return [{"config_id": config_id, "label": config_id, "tp": tp, "num_tokens": n, "status": status, "error": error,
             "latency_ms": 1.0, "is_baseline": config_id == "base", "sweep": "s"} for n in sizes]


def test_a_row_cut_short_leaves_its_config_to_run_again(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(rows("base", (1, 8, 64)) + rows("a", (1, 8, 64)))
    text = folder.rows_path.read_text()
    folder.rows_path.write_text(text[: len(text) - 25])  # the last row, half written
    assert torn_tail(folder.rows_path)
    assert completed_configs(folder.rows(), [1, 8, 64]) == {("base", 1)}  # "a" lost its 64: it runs again
    folder.append(rows("a", (1, 8, 64)))
    assert not torn_tail(folder.rows_path)
    assert all(json.loads(line) for line in folder.rows_path.read_text().splitlines())  # the torn line is gone
    assert completed_configs(folder.rows(), [1, 8, 64]) == {("base", 1), ("a", 1)}
    assert len(folder.table()) == 6


def test_failed_sizes_and_a_skip_for_want_of_gpus_run_again_on_resume():
    done = rows("base", (1, 8), tp=2) + rows("a", (1,), tp=2) + rows("a", (8,), "failed", tp=2)
    done += rows("b", (1, 8), "skipped", tp=4, error=f"TP=4 needs 4 GPUs; the Ray cluster has 2 ({RESUMABLE_SKIP})")
    done += rows("c", (1, 8), "skipped", tp=2, error="invalid PassConfig: nothing to do with GPUs")
    assert completed_configs(done, [1, 8]) == {("base", 2), ("c", 2)}


def test_a_resume_measures_only_the_sizes_a_config_lacks_and_the_baseline_whole():
    """A paired batch streams its rows size by size, so a run cut short leaves configs measured at some sizes: the
    resume runs those at the rest only (``num_tokens``), the baseline at every size (the others are checked
    against its outputs), and the launcher batches only configs left at the same sizes."""
    from fusiontune.harness.launcher import batches, job_for
    from fusiontune.harness.sweep import expand, parse_sweep

    plan = expand(parse_sweep("""
name: resume
model: {preset: tiny, quant: fp8-static, num_layers: 1}
num_tokens: [1, 8, 64]
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}
measure: {paired: true}
"""))
    base, *variants = [c for c in plan.configs if not c.baseline_repeat]
    half, failed, whole = variants
    journal = rows(base.config_id, (64, 8)) + rows(half.config_id, (64, 8))
    journal += rows(failed.config_id, (64,)) + rows(failed.config_id, (8,), "failed")
    measured = measured_sizes(journal)
    assert measured[(half.config_id, 1)] == {64, 8} and measured[(failed.config_id, 1)] == {64}
    left = {c.config_id: c for c in plan.without(set(), measured).configs}
    assert left[base.config_id].num_tokens == () and left[whole.config_id].num_tokens == ()
    assert left[half.config_id].num_tokens == (1,) and left[failed.config_id].num_tokens == (1, 8)
    assert job_for(plan, left[half.config_id]).num_tokens == [1]
    assert job_for(plan, left[whole.config_id]).num_tokens == [1, 8, 64]
    for batch in batches([left[c.config_id] for c in variants], 1):
        assert len({c.num_tokens for c in batch}) == 1
    assert len(batches([left[c.config_id] for c in variants], 1)) == 3


def test_a_resume_on_another_kind_of_device_is_refused_before_it_records_anything(tmp_path):
    """An H100's rows are not resumed on an H200 (a call may land on either); the same kind of GPU, a CPU with
    other thread counts, another TP size or a folder without measured rows go on."""

    folder = RunFolder(tmp_path)
    folder.append([{**row, "device": "NVIDIA H100 80GB HBM3"} for row in rows("base", (1, 8))]
                  + [{**row, "device": "cpu (2 cores, 1 threads)"} for row in rows("base", (1,), tp=2)])
    with pytest.raises(OtherMachine, match="TP=1 rows measured on NVIDIA H100 80GB HBM3.*NVIDIA H200"):
        check_same_machine(folder, 1, {"NVIDIA H200"})
    check_same_machine(folder, 1, {"NVIDIA H100 80GB HBM3"})
    check_same_machine(folder, 2, {"cpu (16 cores, 4 threads)"})
    check_same_machine(folder, 4, {"NVIDIA H200"})
    check_same_machine(RunFolder(tmp_path / "new"), 1, {"NVIDIA H200"})


def test_a_new_run_sets_aside_everything_the_earlier_one_wrote(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(rows("base", (1,)))
    for name in ("report.md", "report.html", "heatmap.png", "speedups.parquet", "tune.json", "study.db"):
        (tmp_path / name).write_text("stale")
    (tmp_path / "logs").mkdir()
    kept = folder.set_aside()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]
    assert (kept / "tune.json").exists() and (kept / "rows.jsonl").exists() and (kept / "logs").is_dir()


def test_begin_resumes_a_run_of_its_own_kind_and_sets_aside_any_other(tmp_path):
    """The one way a run opens its folder: a sweep's --resume keeps its rows; a new sweep, or a tune into a sweep's
    folder, moves them aside first; a tune and its grid share a folder (they share the study)."""
    folder = RunFolder(tmp_path)
    assert folder.begin("name: s", "s.yaml", "sweep", False, {"planned": 2}) is None  # nothing there yet
    folder.append(rows("base", (1,)))
    assert folder.begin("name: s", "s.yaml", "sweep", True, {}) is None
    assert folder.rows_path.exists() and "resumed" in folder.manifest() and folder.manifest()["planned"] == 2
    said = folder.begin("name: s", "s.yaml", "sweep", False, {})
    assert said and "earlier sweep" in said and not folder.rows_path.exists()
    folder.append(rows("base", (1,)))
    said = folder.begin("name: t", "t.yaml", "tune", True, {})
    assert said and not folder.rows_path.exists() and folder.manifest()["kind"] == "tune"
    (tmp_path / "study.db").write_text("trials")
    assert folder.begin("name: t", "t.yaml", "tune-grid", True, {}) is None and (tmp_path / "study.db").exists()
    assert len(list((tmp_path / "earlier").iterdir())) == 2


def test_rows_from_before_the_schema_version_read_as_version_1(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(rows("base", (1, 8)))
    assert folder.table()["schema_version"].tolist() == [1, 1]


def test_the_table_is_rebuilt_from_the_rows_when_the_parquet_is_corrupt(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append(rows("base", (1, 8)) + rows("a", (1, 8)))
    folder.parquet_path.write_bytes(b"PAR1 not really")
    assert len(folder.table()) == 4
    assert len(pd.read_parquet(folder.parquet_path)) == 4  # written again


def test_resume_with_another_sweep_is_refused_naming_both(tmp_path):
    sweep = tmp_path / "a.yaml"
    sweep.write_text("name: a\nmodel: {preset: tiny}\nnum_tokens: [1]\n")
    other = tmp_path / "b.yaml"
    other.write_text("name: a\nmodel: {preset: tiny, quant: fp8-static}\nnum_tokens: [1]\n")
    folder = RunFolder(tmp_path / "run")
    folder.write_manifest(sweep.read_text(), str(sweep), {})
    result = CliRunner().invoke(app, ["run", str(other), "--out", str(folder.path), "--resume", "--dry-run"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert f"holds a run of a ({sweep})" in result.output and "differs in model" in result.output
    same = CliRunner().invoke(app, ["run", str(sweep), "--out", str(folder.path), "--resume", "--dry-run"])
    assert same.exit_code == 0, same.output


def write_sweep(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nmodel: {preset: tiny}\nnum_tokens: [1, 8]\nvariants: [{fuse_norm_quant: true}]\n")
    return sweep


def test_exit_codes_say_what_happened(tmp_path, monkeypatch):
    """0: every config ok; 1: some failed (after the report); 130: interrupted, with how to continue."""
    import fusiontune.harness.launcher as launcher

    sweep = write_sweep(tmp_path)

    def measured(status):
        def fake_run_plan(plan, folder, **_):
            folder.append(rows("base", (1, 8)) + rows("a", (1, 8), status))
        return fake_run_plan

    monkeypatch.setattr(launcher, "run_plan", measured("ok"))
    assert CliRunner().invoke(app, ["run", str(sweep), "--out", str(tmp_path / "ok")]).exit_code == 0
    monkeypatch.setattr(launcher, "run_plan", measured("failed"))
    failed = CliRunner().invoke(app, ["run", str(sweep), "--out", str(tmp_path / "bad")], env={"COLUMNS": "200"})
    assert failed.exit_code == 1 and "1 config(s) failed or were incorrect: TP=1 a" in failed.output
    assert (tmp_path / "bad" / "report.md").exists()

    def interrupted(plan, folder, **_):
        folder.append(rows("base", (1, 8)))
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher, "run_plan", interrupted)
    stopped = CliRunner().invoke(app, ["run", str(sweep), "--out", str(tmp_path / "cut")], env={"COLUMNS": "300"})
    assert stopped.exit_code == 130 and "--resume` continues" in stopped.output
    assert len(RunFolder(tmp_path / "cut").rows()) == 2


def test_reports_of_runs_that_measured_nothing_and_of_foreign_files(tmp_path):
    from fusiontune.harness.compare import compare
    from fusiontune.harness.report import write_report

    skipped = RunFolder(tmp_path / "skipped")
    skipped.append([{k: v for k, v in r.items() if k != "latency_ms"} for r in rows("a", (1, 8), "skipped")])
    md, png = write_report(skipped.path)
    assert "No config was measured: every one was skipped" in md.read_text() and not png.exists()
    assert compare(skipped.path, skipped.path).empty  # nothing to judge (the CLI says so, exit 2)
    failed = RunFolder(tmp_path / "failed")
    failed.append(rows("base", (1, 8), "failed") + rows("a", (1, 8), "failed"))
    assert "## Failed or incorrect" in write_report(failed.path)[0].read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "rows.jsonl").write_text('{"a": 1}\n')
    result = CliRunner().invoke(app, ["report", str(foreign)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "is not a fusiontune run: its rows lack config_id" in result.output



def test_the_manifest_names_the_code_that_ran_by_its_content(tmp_path):
    """``source_digest`` names the code by content, where a copy of the tree beside an older ``.git`` makes
    ``git_revision`` name the wrong commit: it is in every manifest and changes with any package file."""
    from fusiontune.harness.results import source_digest

    folder = RunFolder(tmp_path / "run")
    folder.write_manifest("name: a\n", "a.yaml", {})
    assert folder.manifest()["source_digest"] == source_digest() and len(source_digest()) == 16
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "code.py").write_text("x = 1\n")
    before = source_digest({"pkg": package})
    (package / "code.py").write_text("x = 2\n")
    assert source_digest({"pkg": package}) != before
