"""The command line: help everywhere, dry runs, and bad input answered with a message and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusiontune.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [["passes"], ["bench-kernels"], [], ["run"], ["report"], ["resolve"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["run", "sweeps/smoke-cpu.yaml", "--dry-run", "--out", str(tmp_path / "r")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "all fusions off (baseline)" in result.output and "dropped: same effective config" in result.output
    assert not (tmp_path / "r").exists()
    twice = runner.invoke(app, ["run", "sweeps/smoke-cpu.yaml", "--dry-run", "--num-runs", "2", "--groups", "2"],
                          env={"COLUMNS": "200"})
    assert twice.exit_code == 0 and twice.output.count("(run 2)") == 6  # 3 configs x 2 TP sizes
    bad = runner.invoke(app, ["run", "sweeps/smoke-cpu.yaml", "--dry-run", "--groups", "many"])
    assert bad.exit_code == 2 and "--groups takes 'auto' or a number >= 1, got 'many'" in bad.output


def test_bad_sweep_exits_2_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {preset: tiny, quantt: fp8-static}\nnum_tokens: [1]\n")
    result = runner.invoke(app, ["run", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "model.quantt: unknown key" in result.output


def test_report_refuses_a_folder_that_is_no_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "is not a run folder" in result.output


def test_resolve_explains_each_field():
    result = runner.invoke(app, ["resolve", "-O", "2", "--vendor", "cuda", "--capability", "90", "--tp", "2",
                                 "--hidden-size", "8192", "--flashinfer", "--set", "fuse_gemm_comms=true"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "sm90, TP=2, FlashInfer installed" in result.output
    assert "switched on because fuse_gemm_comms requires it" in result.output
    bad = runner.invoke(app, ["resolve", "--set", "fuse_norm_quantt=true"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "fuse_norm_quantt" in bad.output


def test_passes_lists_every_fusion_with_range_defaults_and_why_not():
    from fusiontune.passes.fusions import PASSES

    result = runner.invoke(app, ["passes", "--vendor", "cuda", "--capability", "90", "--tp", "4", "--hidden-size",
                                 "8192", "--flashinfer", "--quant", "fp8-static"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert {spec.flag for spec in PASSES} <= set(lines)
    # vLLM's sm90 table: 2 MB at TP=4 is 128 tokens of hidden 8192 in bf16; SP: 8 MB per GPU x 4 = 2048 tokens.
    assert "num_tokens <= 128" in lines["fuse_allreduce_rms"]
    assert "num_tokens >= 2048" in lines["enable_sp"]
    assert "│ off │ off │ on  │ on  │" in lines["fuse_allreduce_rms"]  # O2 and up on Hopper with FlashInfer
    assert "yes (on from O1)" in lines["fuse_norm_quant"]
    cpu = runner.invoke(app, ["passes", "--vendor", "cpu", "--quant", "none"], env={"COLUMNS": "250"})
    assert "no pattern for quant=none" in cpu.output


def test_installed_layout_has_no_bare_top_level_modules(tmp_path):
    """Only fusiontune.* is installed: no top-level kernels/passes/harness (``kernels`` is a PyPI package)."""
    code = ("import importlib.util as u, fusiontune.kernels, fusiontune.passes, fusiontune.harness;"
            "print([u.find_spec(n) for n in ('kernels', 'passes', 'harness')]);"
            "print(fusiontune.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == "[None, None, None]"
    assert out.stdout.splitlines()[1].endswith("kernels/__init__.py")
    console = subprocess.run(["fusiontune", "--help"], capture_output=True, text=True)
    assert console.returncode == 0 and "run" in console.stdout


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: x\nmodel: {preset: tiny}\nnum_tokens: [1]\nnum_tokens: [8]\n")
    result = runner.invoke(app, ["run", str(twice), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "key 'num_tokens' given twice (lines 3 and 4)" in result.output


def test_version_ranges_and_flags_without_placeholders():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("fusiontune ")
    level = runner.invoke(app, ["resolve", "-O", "5"], env={"COLUMNS": "200"})
    assert level.exit_code == 2 and "less than or equal to 3" in level.output
    for command in (["run", "--config-timeout", "0", "sweeps/smoke-cpu.yaml"], ["resolve", "--tp", "0"]):
        assert runner.invoke(app, command).exit_code == 2, command
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    dry_run = next(line for line in text.splitlines() if "--dry-run" in line)
    assert "<bool>" not in dry_run


@pytest.mark.parametrize("command", [
    ["run", "sweeps/smoke-cpu.yaml", "--dry-run", "--out"],
    ["tune", "sweeps/tune-cpu.yaml", "--out"],
    ["export", "results/tune-multi-gpu-llama8b-bf16", "--out"],
])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, monkeypatch, command):
    """A file where the run folder goes, a file on the way to it, or a place this user cannot write: one line
    naming the option and the place, exit 2, nothing created (it was a traceback after the work)."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for out, says in ((blocker, "a file is there; name a folder"),
                      (blocker / "run", f"{blocker} is a file, so nothing can be made under it")):
        result = runner.invoke(app, [*command, str(out)], env={"COLUMNS": "400"})  # tmp paths are long
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else
                        real_access(path, mode))  # root may write anywhere: a read-only folder, as a user has it
    result = runner.invoke(app, [*command, str(tmp_path / "new")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "is not writable by this user" in result.output, result.output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, says", [
    (["resolve", "--vendor", "nvidia"], "--vendor 'nvidia': choose one of detect, cuda, rocm, cpu"),
    (["resolve", "--vendor", "cuda", "--capability", "-3"], "Invalid value for '--capability'"),
    (["passes", "--quant", "int3"], "--quant 'int3': choose one of none, fp8-static"),
    (["thresholds", "--quant", "int3"], "--quant 'int3': choose one of none, fp8-static"),
    (["bench-kernels", "--tp", "2", "--tokens", "0"], "Invalid value for '--tokens'"),
])
def test_platform_and_shape_options_are_checked(command, says):
    result = runner.invoke(app, command, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and says in result.output, result.output


@pytest.mark.parametrize("command", [["run", "sweeps/smoke-cpu.yaml", "--no-report"], ["tune", "sweeps/tune-cpu.yaml"]])
def test_a_cluster_that_does_not_answer_is_one_line(tmp_path, command):
    """An address where no Ray listens: one line naming the option and the address, exit 2, in seconds and before
    any folder is made (Ray would retry for a minute, then end the process with a fatal log of its own)."""
    from fusiontune.harness.process_group import free_port

    address = f"127.0.0.1:{free_port()}"
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "run"), "--address", address],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    line = f"--address / cluster.address: cannot join the Ray cluster at '{address}': nothing answers there"
    assert result.output.strip().splitlines()[-1].startswith(line), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, says", [
    (("histogram: {1: 0.6, 16: 0.3, 128: 0.1}", "trace: no-such-steps.csv"), "workload.trace: cannot read"),
    (("model: {preset: tiny, quant: fp8-static}", "model: {hf_config: no-such/config.json, quant: fp8-static}"),
     "model: "),
])
def test_a_tune_that_cannot_be_planned_says_so_before_any_cluster_is_asked(tmp_path, change, says):
    """A workload or a model's config.json that cannot be read: one line, exit 2, before Ray is joined (the address
    given answers nowhere, so a join would say that instead) and before any folder is made."""
    from fusiontune.harness.process_group import free_port

    tune = tmp_path / "tune.yaml"
    tune.write_text(Path("sweeps/tune-cpu.yaml").read_text().replace(*change))
    result = runner.invoke(app, ["tune", str(tune), "--out", str(tmp_path / "run"), "--address",
                                 f"127.0.0.1:{free_port()}"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and says in result.output, result.output
    assert "cannot join" not in result.output and not (tmp_path / "run").exists()


def _tune_whose_run_raises(error: Exception, tmp_path, monkeypatch):
    """``fusiontune tune`` with a tuner whose run raises ``error`` (its planning and cluster as on a CPU)."""
    from fusiontune.harness import tuner
    from fusiontune.passes.platform import Platform

    def raises(self):
        raise error

    monkeypatch.setattr("fusiontune.cli._workers_platform", lambda cluster, address: Platform.detect(1, 256, 2))
    monkeypatch.setattr(tuner.Tuner, "run", raises)
    return runner.invoke(app, ["tune", "sweeps/tune-cpu.yaml", "--out", str(tmp_path / "run")],
                         env={"COLUMNS": "300"})


def test_a_tune_whose_search_fails_says_why_and_exits_1(tmp_path, monkeypatch):
    """An error the search raises (``SweepError``) is said in one line with exit 1, not a traceback."""
    from fusiontune.harness.sweep import SweepError

    result = _tune_whose_run_raises(SweepError("the search could not go on"), tmp_path, monkeypatch)
    assert result.exit_code == 1 and "the search could not go on" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_tune_resumed_on_another_kind_of_machine_says_so_and_exits_2(tmp_path, monkeypatch):
    """The tuner's refusal to add another machine kind's values to a study (``OtherMachine``) is one line, exit 2."""
    from fusiontune.harness.launcher import OtherMachine

    result = _tune_whose_run_raises(OtherMachine("results/t holds TP=1 rows measured on NVIDIA H100 80GB HBM3, and "
                                                 "this run's TP=1 group is on NVIDIA H200"), tmp_path, monkeypatch)
    assert result.exit_code == 2 and "measured on NVIDIA H100 80GB HBM3" in result.output, result.output
    assert "Traceback" not in result.output


def test_summarize_names_the_folder_without_a_study(tmp_path):
    """``tune --summarize`` measures nothing; where the folder holds no study it says so in one line, exit 2, and
    makes nothing."""
    result = runner.invoke(app, ["tune", "sweeps/tune-cpu.yaml", "--out", str(tmp_path / "run"), "--summarize"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "--summarize: " in result.output and "holds no study" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
