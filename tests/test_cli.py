"""The command line: help everywhere, dry runs, and bad input answered with a message and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fusiontune.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["report"], ["resolve"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["run", "sweeps/smoke-cpu.yaml", "--dry-run", "--out", str(tmp_path / "r")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "all fusions off (baseline)" in result.output and "dropped: same effective config" in result.output
    assert not (tmp_path / "r").exists()


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
