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


def sass_lines(*args) -> list[str]:
    """What the script prints for these arguments, line by line (the test skipped where Triton has no nvdisasm)."""
    result = show(*args)
    if result.returncode and "nvdisasm" in result.stderr + result.stdout:
        pytest.skip("this Triton build has no nvdisasm")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def access(op: str, nbytes: int) -> str:
    """The SASS spelling of a global load or store of ``nbytes`` per thread (LDG.E, LDG.E.64, LDG.E.128)."""
    return {4: f"{op}.E ", 8: f"{op}.E.64 ", 16: f"{op}.E.128 "}[nbytes]


def bytes_per_thread(form: str) -> tuple[int, int]:
    """(loaded, stored) bytes per thread and access: SiLU -> static reads bf16 and writes FP8 at the elementwise
    tile's columns per thread; the per-group norm at H=4096 holds 32 columns per thread, in 16-byte accesses."""
    from fusiontune.kernels import triton_rows
    if form == "silu->static":
        tile = triton_rows.ELEMENTWISE_TILE
        columns = tile // (32 * triton_rows._warps(tile))
        return 2 * columns, columns
    return 16, 16


@pytest.mark.parametrize("form", ["silu->static", "norm->per-group"])
def test_machine_code_of_a_form(form):
    """At H=4096 the columns arrive in wide loads and the codes leave in wide stores (the alignment Triton's
    launcher finds on real tensors), as wide as each thread's columns allow."""
    lines = sass_lines(form, "--hidden", "4096", "--rows", "1")
    load_bytes, store_bytes = bytes_per_thread(form)
    loads, store = access("LDG", load_bytes), access("STG", store_bytes)
    assert sum(loads in line for line in lines) >= 2 and any(store in line for line in lines), "\n".join(lines)
    assert lines[-1].startswith("-- ") and int(lines[-1].split()[1]) > 60


def loads_before_first_barrier(*args) -> int:
    lines = sass_lines(*args)
    first_barrier = next(i for i, line in enumerate(lines) if "BAR.SYNC" in line)
    return sum("LDG.E.128" in line for line in lines[:first_barrier])


def test_row_walk_loads_the_next_row_before_reducing():
    """The row-walk kernel's point: a program's loads of the next row are issued before the current row's
    reduction waits at its first barrier, so before it the walk has twice the per-row kernel's row loads (the
    first row's and the next's; the weight comes after the reduction in both)."""
    per_row = loads_before_first_barrier("norm->per-token", "--rows", "4096")
    walk = loads_before_first_barrier("norm->per-token", "--rows", "4096", "--walk")
    assert per_row == 4 and walk == 2 * per_row, (per_row, walk)  # 32 bf16 columns per thread: 4 x 16 bytes


def test_walk_refuses_an_elementwise_form():
    result = show("silu", "--walk")
    assert result.returncode == 2 and "--walk: silu" in result.stderr


def test_unknown_form_is_refused():
    result = show("gelu")
    assert result.returncode == 2 and "invalid choice" in result.stderr
