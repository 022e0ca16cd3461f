"""scripts/kernel_table.py --against: ours before over ours now per row, and the refusal of another GPU type."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernel_table.py"
TABLE = ROOT / "docs" / "data" / "2026-12-07-h100-bench-kernels-new-defaults-b.csv"


def table_rows(path: Path, **changes) -> Path:
    """The first four rows of a committed H100 table (rms_norm at H=4096), with ``changes`` applied."""
    rows = pd.read_csv(TABLE).head(4)
    for column, value in changes.items():
        rows[column] = value(rows[column]) if callable(value) else value
    rows.to_csv(path, index=False)
    return path


def kernel_table(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_against_gives_the_ratio_and_marks_spreads_apart(tmp_path):
    now = table_rows(tmp_path / "now.csv")
    # twice as slow before, spreads included: 2.000 and apart
    before = table_rows(tmp_path / "before.csv", ours_us=lambda c: 2 * c, ours_p10_us=lambda c: 2 * c,
                        ours_p90_us=lambda c: 2 * c)
    done = kernel_table(now, "--against", before)
    assert done.returncode == 0, done.stderr
    compared = done.stdout[done.stdout.index("**Ours before / ours now**"):]
    assert "(4 rows in both tables" in compared
    ratios = [line.split("|")[6].strip() for line in compared.splitlines() if line.startswith("| rms_norm")]
    assert ratios == ["2.000*"] * 4


def test_against_an_equal_table_marks_nothing(tmp_path):
    now = table_rows(tmp_path / "now.csv")
    done = kernel_table(now, "--against", now)
    ratios = [line.split("|")[6].strip() for line in done.stdout.splitlines() if line.startswith("| rms_norm")]
    assert ratios == ["1.000"] * 4


def test_against_another_gpu_type_is_refused_before_any_table(tmp_path):
    now = table_rows(tmp_path / "now.csv")
    other = table_rows(tmp_path / "other.csv", device="NVIDIA H200")
    done = kernel_table(now, "--against", other)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--against" in done.stderr and "NVIDIA H200" in done.stderr and "compare one GPU type" in done.stderr
