"""scripts/show_row_sass.py compiles the row kernel for sm_90 without a GPU: its argument list must stay the
kernel's, and what it prints must be the kernel's own load -> store path."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "show_row_sass.py"


def show(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.mark.parametrize("form, loads, store", [("silu->static", "LDG.E.128", "STG.E.64"),
                                                 ("norm->per-group", "LDG.E.128", "STG.E.128")])
def test_machine_code_of_a_form(form, loads, store):
    """At H=4096 the columns arrive in 16-byte loads and the codes leave in wide stores (the alignment Triton's
    launcher finds on real tensors): SiLU -> static, 8 columns per thread, one 8-byte store; the per-group norm,
    32 columns per thread, 16-byte stores."""
    result = show(form, "--hidden", "4096", "--rows", "1")
    if result.returncode and "nvdisasm" in result.stderr + result.stdout:
        pytest.skip("this Triton build has no nvdisasm")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(loads in line for line in lines) >= 2 and any(store in line for line in lines), result.stdout
    assert lines[-1].startswith("-- ") and int(lines[-1].split()[1]) > 100


def test_unknown_form_is_refused():
    result = show("gelu")
    assert result.returncode == 2 and "invalid choice" in result.stderr
