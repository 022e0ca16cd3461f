"""scripts/compare_row_kernels.py's versions: a copy of the row kernel's module, optionally with constants set
(``PATH:NAME=VALUE,...``), so an A/B of a tile or a bound needs no copy per value. The timing itself needs a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from compare_row_kernels import load_version  # noqa: E402

KERNEL = str(ROOT / "kernels" / "triton_rows.py")


def test_a_version_with_constants_set_changes_only_its_copy():
    from fusiontune.kernels import triton_rows

    label, module = load_version(f"{KERNEL}:ELEMENTWISE_TILE=256,PER_GROUP_TILE=512")
    assert label == "ELEMENTWISE_TILE=256,PER_GROUP_TILE=512"
    assert module.row_block(4096, False, None) == 256 and module.row_block(4096, False, "fp8-per-group", 128) == 512
    assert triton_rows.row_block(4096, False, None) == triton_rows.ELEMENTWISE_TILE != 256
    plain_label, plain = load_version(KERNEL)
    assert plain_label == "triton_rows" and plain.ELEMENTWISE_TILE == triton_rows.ELEMENTWISE_TILE


@pytest.mark.parametrize("spec, names", [(":NO_SUCH=1", "'NO_SUCH' is not a numeric constant"),
                                         (":ELEMENTWISE_TILE", "'ELEMENTWISE_TILE' is not a numeric constant"),
                                         (":ELEMENTWISE_TILE=big", "'big' is not a number for ELEMENTWISE_TILE"),
                                         (":INPUT_PLAIN=0,load=1", "'load' is not a numeric constant")])
def test_a_bad_setting_is_one_line_naming_it_and_exit_code_2(spec, names):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_row_kernels.py"), KERNEL + spec],
                          capture_output=True, text=True)
    assert done.returncode == 2 and names in done.stderr.splitlines()[-1], done.stderr
