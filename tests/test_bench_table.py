"""The bench table a cut-short bench-kernels run leaves, and what a resumed run keeps of it (harness/bench_table)."""

import csv

import pytest

from fusiontune.harness import bench_table

FIELDS = ["device", "op", "hidden", "num_tokens", "dtype", "ours_us", "ours_error"]


def whole(op, hidden, tokens, us, device="NVIDIA H200", dtype="bfloat16"):
    return {"device": device, "op": op, "hidden": hidden, "num_tokens": tokens, "dtype": dtype, "ours_us": us,
            "ours_error": None}


def written(path, rows, torn_tail: str = ""):
    sink, writer = bench_table.open_table(path, FIELDS, append=False)
    writer.writerows(rows)
    sink.write(torn_tail)
    sink.close()


def lines(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_no_earlier_table_is_no_rows(tmp_path):
    assert bench_table.earlier_rows(tmp_path / "none.csv", FIELDS, {}) == []
    (tmp_path / "empty.csv").write_text("")
    assert bench_table.earlier_rows(tmp_path / "empty.csv", FIELDS, {}) == []


def test_a_torn_row_is_dropped_and_new_rows_follow_the_whole_ones(tmp_path):
    """A run killed while writing its third row: the resumed run keeps two rows, typed as they were written, and the
    rows it measures come after them, the header once."""
    path = tmp_path / "bench.csv"
    written(path, [whole("rms_norm", 4096, 1, 1.571), whole("rms_norm", 4096, 64, 1.916)],
            torn_tail="NVIDIA H200,rms_norm,4096,40")
    rows = bench_table.earlier_rows(path, FIELDS, {"device": "NVIDIA H200", "dtype": "bfloat16"})
    assert [bench_table.row_key(r) for r in rows] == [("rms_norm", 4096, 1), ("rms_norm", 4096, 64)]
    assert rows[0]["ours_us"] == 1.571 and rows[0]["hidden"] == 4096 and rows[0]["ours_error"] is None
    sink, writer = bench_table.open_table(path, FIELDS, append=True)
    writer.writerow(whole("rms_norm", 4096, 4096, 19.008))
    sink.close()
    table = lines(path)
    assert table[0] == FIELDS and sum(line == FIELDS for line in table) == 1
    assert [line[3] for line in table[1:]] == ["1", "64", "4096"]


@pytest.mark.parametrize("field, value", [("device", "NVIDIA H100 80GB HBM3"), ("dtype", "float16")])
def test_a_table_of_another_device_or_dtype_is_not_resumed(tmp_path, field, value):
    path = tmp_path / "bench.csv"
    written(path, [whole("rms_norm", 4096, 1, 1.571)])
    same = {"device": "NVIDIA H200", "dtype": "bfloat16"} | {field: value}
    with pytest.raises(bench_table.TableMismatch, match=f"rows with {field} "):
        bench_table.earlier_rows(path, FIELDS, same)
    assert len(lines(path)) == 2  # left as it was


def test_a_table_of_other_columns_is_not_resumed(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text("op,hidden,num_tokens,us\nrms_norm,4096,1,1.5\n")
    with pytest.raises(bench_table.TableMismatch, match="other columns"):
        bench_table.earlier_rows(path, FIELDS, {})


def test_a_new_table_replaces_the_file(tmp_path):
    path = tmp_path / "bench.csv"
    written(path, [whole("rms_norm", 4096, 1, 1.571)])
    sink, _ = bench_table.open_table(path, FIELDS, append=False)
    sink.close()
    assert lines(path) == [FIELDS]
