"""Markdown tables of a bench-kernels CSV, one per op, as docs/benchmarks.md shows them, then how the row kernels
stand against issue 22's targets:

    python3 scripts/kernel_table.py docs/data/<run>.csv
    python3 scripts/kernel_table.py docs/data/<run>.csv --against docs/data/<earlier run>.csv

With ``--against``, a third part compares our kernels row by row with an earlier table of the same GPU type (a
change of launch defaults, say): ours before over ours now, and Inductor's before over now beside it as the control,
since two runs are often two machines and Inductor's code did not change between them.

The targets (every op but attention, which is compute-bound): at least 90% of copy from 4096 tokens; never slower
than Inductor's code for the same expression; within 1.5 us of the empty-kernel floor at 64 tokens and fewer.
"Slower than Inductor" needs Inductor's p90 under ours' p10 (the two spreads apart), so that the replay-to-replay
spread of one run is not read as a loss or a win. Where the CSV has it (from 2026-12-07), each row also shows a
copy of the same bytes at the same size, and the rows that miss a target are set beside it: how far they are from
what any kernel moving those bytes takes there. Two lines say what that copy makes of the targets: how many rows
reach 90% of it from 4096 tokens, and how many of the rows beyond the floor's 1.5 us have a copy beyond it too.
"""

import argparse

import pandas as pd

from fusiontune.harness.bench_table import KEY

COPY_TARGET_PCT = 90
COPY_TARGET_FROM_TOKENS = 4096
FLOOR_GAP_US = 1.5
FLOOR_UP_TO_TOKENS = 64


def cell(value) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}"


def tables(table: pd.DataFrame) -> None:
    for op, rows in table.groupby("op", sort=False):
        limit = "ours_pct_limit" in rows  # CSVs before the fourteenth session hold the copy share alone
        same = "copy_same_us" in rows  # from 2026-12-07
        print(f"**{op}** (µs, median of 30 CUDA-graph replays; ours p10-p90 in brackets; % copy = ours as a share "
              "of copy" + ("; % limit = the read/write limit's time over ours" if limit else "")
              + ("; same-bytes copy = a copy of as many bytes at this size" if same else "") + ")\n")
        print("| H | T | ours | % copy |" + (" % limit |" if limit else "") + (" same-bytes copy |" if same else "")
              + " unfused chain | Inductor (static shape) | FlashInfer |")
        print("|---:|---:|---:|---:|" + ("---:|" if limit else "") + ("---:|" if same else "") + "---:|---:|---:|")
        for r in rows.itertuples():
            share = f" {r.ours_pct_limit:.0f}% |" if limit else ""
            copy = f" {cell(r.copy_same_us)} |" if same else ""
            print(f"| {r.hidden} | {r.num_tokens} | {r.ours_us:.2f} ({r.ours_p10_us:.2f}-{r.ours_p90_us:.2f}) | "
                  f"{r.ours_pct_copy:.0f}% |{share}{copy} {cell(r.unfused_us)} | {cell(r.inductor_us)} | "
                  f"{cell(r.flashinfer_us)} |")
        print()


def same_bytes(r, before: str = "", after: str = "") -> str:
    """'a copy of its bytes here X us, ours Y x that' between ``before`` and ``after`` where the row has the
    same-bytes copy, else ''."""
    copy = getattr(r, "copy_same_us", None)
    if copy is None or pd.isna(copy):
        return ""
    return f"{before}a copy of its bytes here {copy:.2f} us, ours {r.ours_us / copy:.2f}x that{after}"


def targets(table: pd.DataFrame) -> None:
    rows = table[~table.op.str.startswith("attention") & table.ours_us.notna()]
    large = rows[rows.num_tokens >= COPY_TARGET_FROM_TOKENS]
    missed = large[large.ours_pct_copy < COPY_TARGET_PCT]
    print(f"- **{COPY_TARGET_PCT}% of copy from {COPY_TARGET_FROM_TOKENS} tokens**: {len(large) - len(missed)} of "
          f"{len(large)} rows" + ("; under it: " + ", ".join(
              f"{r.op} H={r.hidden} T={r.num_tokens} {r.ours_pct_copy:.0f}% ({r.ours_pct_limit:.0f}% of the "
              f"read/write limit{same_bytes(r, '; ')})" for r in missed.itertuples()) if len(missed) else ""))
    if "copy_same_us" in large:
        known = large[large.copy_same_us.notna()]
        short = known[known.ours_us * COPY_TARGET_PCT / 100 > known.copy_same_us]
        print(f"- **{COPY_TARGET_PCT}% of a copy of the same bytes** (the copy at the row's size, not at 1-4 GiB) from "
              f"{COPY_TARGET_FROM_TOKENS} tokens: {len(known) - len(short)} of {len(known)} rows"
              + ("; under it: " + ", ".join(f"{r.op} H={r.hidden} T={r.num_tokens} "
                                            f"{100 * r.copy_same_us / r.ours_us:.0f}%" for r in short.itertuples())
                 if len(short) else ""))
    both = rows[rows.inductor_us.notna()]
    slower = both[both.inductor_p90_us < both.ours_p10_us]
    print(f"- **Never slower than Inductor**: {len(both) - len(slower)} of {len(both)} rows; slower (spreads apart): "
          + (", ".join(f"{r.op} H={r.hidden} T={r.num_tokens} {r.ours_us:.2f} against {r.inductor_us:.2f} us "
                       f"({r.inductor_us / r.ours_us:.3f}x)" for r in slower.itertuples()) or "none"))
    small = rows[rows.num_tokens <= FLOOR_UP_TO_TOKENS]
    gap = small.ours_us - small.empty_kernel_us
    far = small[gap > FLOOR_GAP_US]
    print(f"- **Within {FLOOR_GAP_US} us of the empty kernel ({table.empty_kernel_us.iloc[0]:.2f} us) at "
          f"{FLOOR_UP_TO_TOKENS} tokens and fewer**: {len(small) - len(far)} of {len(small)} rows; beyond: "
          + (", ".join(f"{r.op} H={r.hidden} T={r.num_tokens} +{r.ours_us - r.empty_kernel_us:.2f}"
                       + same_bytes(r, " (", ")")
                       for r in far.itertuples()) or "none"))
    if "copy_same_us" in far and len(far):
        copy_far = far[far.copy_same_us - far.empty_kernel_us > FLOOR_GAP_US]
        print(f"  - of these, {len(copy_far)} are rows where a copy of the same bytes is beyond it too")


def against(table: pd.DataFrame, earlier: pd.DataFrame) -> None:
    """Ours in ``earlier`` over ours in ``table`` per row both hold (above 1: faster now), marked where the two
    p10-p90 spreads are apart, with Inductor's ratio beside it as the machine-to-machine control."""
    cols = [*KEY, "ours_us", "ours_p10_us", "ours_p90_us", "inductor_us"]
    both = earlier[cols].merge(table[cols], on=list(KEY), suffixes=("_before", "_now"))
    both = both[both.ours_us_before.notna() & both.ours_us_now.notna()]
    print(f"**Ours before / ours now** ({len(both)} rows in both tables; * = the p10-p90 spreads apart; "
          "Inductor before / now is the control)\n")
    print("| op | H | T | before µs | now µs | before / now | Inductor before / now |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in both.itertuples():
        apart = r.ours_p90_us_now < r.ours_p10_us_before or r.ours_p90_us_before < r.ours_p10_us_now
        control = (f"{r.inductor_us_before / r.inductor_us_now:.3f}"
                   if pd.notna(r.inductor_us_before) and pd.notna(r.inductor_us_now) else "-")
        print(f"| {r.op} | {r.hidden} | {r.num_tokens} | {r.ours_us_before:.2f} | {r.ours_us_now:.2f} | "
              f"{r.ours_us_before / r.ours_us_now:.3f}{'*' if apart else ''} | {control} |")
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="a bench-kernels CSV")
    parser.add_argument("--against", metavar="EARLIER_CSV",
                        help="an earlier bench-kernels CSV of the same GPU type: ours then against ours now")
    args = parser.parse_args()
    table = pd.read_csv(args.csv)
    earlier = pd.read_csv(args.against) if args.against else None
    if earlier is not None and set(earlier.device) != set(table.device):
        parser.error(f"--against: {args.against} is from {', '.join(map(str, set(earlier.device)))}, "
                     f"{args.csv} from {', '.join(map(str, set(table.device)))}; compare one GPU type")
    tables(table)
    if not table.empty:  # a run cut before its first row has its header alone
        targets(table)
    if earlier is not None:
        print()
        against(table, earlier)
