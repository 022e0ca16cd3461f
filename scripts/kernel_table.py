"""Markdown tables of a bench-kernels CSV, one per op, as docs/benchmarks.md shows them:
python3 scripts/kernel_table.py docs/data/<run>.csv"""

import sys

import pandas as pd


def cell(value) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}"


table = pd.read_csv(sys.argv[1])
for op, rows in table.groupby("op", sort=False):
    limit = "ours_pct_limit" in rows  # CSVs before the fourteenth session hold the copy share alone
    print(f"**{op}** (µs, median of 30 CUDA-graph replays; ours p10-p90 in brackets; % copy = ours as a share of "
          "copy" + ("; % limit = the read/write limit's time over ours" if limit else "") + ")\n")
    print("| H | T | ours | % copy |" + (" % limit |" if limit else "") + " unfused chain | Inductor (static shape) "
          "| FlashInfer |")
    print("|---:|---:|---:|---:|" + ("---:|" if limit else "") + "---:|---:|---:|")
    for r in rows.itertuples():
        share = f" {r.ours_pct_limit:.0f}% |" if limit else ""
        print(f"| {r.hidden} | {r.num_tokens} | {r.ours_us:.2f} ({r.ours_p10_us:.2f}-{r.ours_p90_us:.2f}) | "
              f"{r.ours_pct_copy:.0f}% |{share} {cell(r.unfused_us)} | {cell(r.inductor_us)} | "
              f"{cell(r.flashinfer_us)} |")
    print()
