"""How much sooner a sweep ends with more TP groups: runs one sweep through the CLI with --groups 1, 2, ...
(a fresh Inductor cache each time, so no run inherits another's compiles) and prints the wall times.

    python scripts/bench_groups.py sweeps/groups-cpu.yaml --groups 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table


def run(sweep: str, groups: int, workdir: Path) -> dict:
    out = workdir / f"groups-{groups}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / f"inductor-{groups}")}
    t0 = time.perf_counter()
    subprocess.run(["fusiontune", "run", sweep, "--out", str(out), "--groups", str(groups), "--no-report"],
                   check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    table = pd.read_parquet(out / "results.parquet")
    return {"groups": groups, "wall_s": wall, "configs": table["config_id"].nunique(),
            "ok": int((table["status"] == "ok").sum()), "rows": len(table),
            "compile_s": statistics.median(table.groupby("config_id")["compile_s"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(args.sweep, groups, Path(tmp)) for groups in args.groups]
    table = Table(title=f"{args.sweep}: wall time of the whole sweep by TP groups ({os.cpu_count()} cores)")
    for column in ("groups", "wall s", "vs 1 group", "configs", "rows ok", "median compile s per config"):
        table.add_column(column, justify="right")
    first = results[0]["wall_s"]
    for r in results:
        table.add_row(str(r["groups"]), f"{r['wall_s']:.1f}", f"{first / r['wall_s']:.2f}x", str(r["configs"]),
                      f"{r['ok']}/{r['rows']}", f"{r['compile_s']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
