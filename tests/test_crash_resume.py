"""A run killed the way a machine kills it, then resumed. One TP worker is killed mid-config, then the whole run
is killed with its last row half written. The resume measures what is missing and nothing twice, and every row
written before the crash is kept as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time: tests/conftest.py
SWEEP = """
name: crash
model: {preset: tiny, quant: fp8-static, num_layers: 1}
tp: [1]
num_tokens: [1, 16, 64]
optimization_level: 0
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}
measure: {warmup: 1, repeats: 40, max_repeats: 40, profile: false, paired: false}  # a job per config
"""
SIZES = 3
CONFIGS = 5  # all-off, three with a fusion on, all-off again


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for_rows(path: Path, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while len(_lines(path)) < count:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {count} rows"
        assert time.monotonic() < end, f"fewer than {count} rows after {timeout} s"
        time.sleep(0.2)


def _tp_workers(session: int) -> list[int]:
    """The run's TP worker processes (Ray titles them ray::TPWorker...), those of its session first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = os.getsid(int(entry.name)) == session
        except OSError:
            continue
        if "TPWorker" in title:
            found.append((not ours, int(entry.name)))
    return [pid for _, pid in sorted(found)]


def test_a_killed_worker_and_a_killed_run_resume_with_no_row_lost_or_doubled(tmp_path):
    sweep, run = tmp_path / "crash.yaml", tmp_path / "run"
    sweep.write_text(SWEEP)
    rows_path = run / "rows.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(["fusiontune", "run", str(sweep), "--out", str(run), "--no-report"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_rows(rows_path, SIZES, proc)  # the baseline is in
            workers = _tp_workers(proc.pid)
            assert workers, "no TP worker process found"
            os.kill(workers[0], signal.SIGKILL)  # mid-config: the worker dies (the OOM killer, a segfault)
            _wait_for_rows(rows_path, 3 * SIZES, proc)
            assert proc.poll() is None, "the run finished before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the machine goes down: driver, Ray and workers
            proc.wait(timeout=60)
    first = (tmp_path / "first.log").read_text()
    text = rows_path.read_text()
    assert text.endswith("\n")
    whole = text.splitlines()
    torn_at = len(text) - len(whole[-1]) // 2 - 1
    rows_path.write_text(text[:torn_at])  # its last row half written
    kept = whole[:-1]
    kept_rows = [json.loads(line) for line in kept]
    assert any(r["status"] == "failed" for r in kept_rows), first  # the killed worker's config, recorded

    resumed = subprocess.run(["fusiontune", "run", str(sweep), "--out", str(run), "--resume", "--no-report"],
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "its last row was cut short" in " ".join(resumed.stdout.split())  # the console wraps long paths' lines

    final = _lines(rows_path)
    assert final[:len(kept)] == kept  # nothing written before the crash was lost or rewritten
    table = pd.read_parquet(run / "results.parquet")
    assert len(table) == CONFIGS * SIZES and (table["status"] == "ok").all(), table[["label", "status"]]
    assert not table.duplicated(["config_id", "tp", "num_tokens"]).any()
    # a config finished before the crash is not measured again; one cut short or failed is, once
    done_before = {r["config_id"] for r in kept_rows if r["status"] == "ok"} - {
        r["config_id"] for r in kept_rows if r["status"] != "ok"}
    complete = {c for c in done_before if sum(r["config_id"] == c for r in kept_rows) == SIZES}
    later = [json.loads(line) for line in final[len(kept):]]
    assert not complete & {r["config_id"] for r in later if not r.get("reference_only")}
    measured_again = pd.Series([r["config_id"] for r in later]).value_counts()
    assert (measured_again <= SIZES).all(), measured_again


PAIRED = """
name: crash-paired
model: {preset: tiny, quant: fp8-static, num_layers: 1}
tp: [1]
num_tokens: [1, 16, 64]
optimization_level: 0
pass_config: {fuse_norm_quant: [false, true], fuse_act_quant: [false, true]}
measure: {warmup: 1, repeats: 200, max_repeats: 200, settle: 0.0001, profile: false, paired: true}  # one batch
"""


def test_a_paired_batch_cut_short_keeps_its_finished_sizes_and_the_resume_measures_only_the_rest(tmp_path):
    """The four configs after all-off are timed together in one batch, which streams its rows size by size
    (largest first). The run is killed once the batch's first size is written: the resume measures those four
    configs at the other two sizes only, and every (config, size) is measured exactly once."""
    sweep, run = tmp_path / "paired.yaml", tmp_path / "run"
    sweep.write_text(PAIRED)
    rows_path = run / "rows.jsonl"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(["fusiontune", "run", str(sweep), "--out", str(run), "--no-report"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_rows(rows_path, SIZES + 4, proc)  # all-off, then the batch's first size: 4 rows
            assert proc.poll() is None, "the run finished before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    kept = [json.loads(line) for line in _lines(rows_path)]
    batch = [r for r in kept if not r["is_baseline"] or r.get("baseline_repeat")]
    assert {r["num_tokens"] for r in batch} == {64} and len(batch) == 4, [(r["label"], r["num_tokens"]) for r in kept]
    assert all(r["paired_speedup"] is not None for r in batch)

    resumed = subprocess.run(["fusiontune", "run", str(sweep), "--out", str(run), "--resume", "--no-report"],
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "4 of them only at the sizes they lack" in " ".join(resumed.stdout.split()), resumed.stdout
    later = [json.loads(line) for line in _lines(rows_path)[len(kept):]]
    assert sorted({r["num_tokens"] for r in later}) == [1, 16] and len(later) == 4 * 2
    table = pd.read_parquet(run / "results.parquet")
    assert len(table) == CONFIGS * SIZES and (table["status"] == "ok").all(), table[["label", "status"]]
    timed = table[~table["is_baseline"].astype(bool) | table["baseline_repeat"].astype(bool)]
    assert timed["paired_speedup"].notna().all()
