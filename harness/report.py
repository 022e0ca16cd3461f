"""Speedup report of a run folder: ``report.md`` and ``speedup.png``.

Speedup is the all-off baseline's median latency over the config's, at the same TP size and num_tokens. It is
shown only where it means something: the config ran (``ok``), matched the baseline's output, and every fusion it
enables actually fired (nonzero match count). Otherwise the cell says why there is no number.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fusiontune.passes.fusions import FUSION_FLAGS  # noqa: E402
from fusiontune.passes.ranges import INDIVISIBLE  # noqa: E402

from .results import RunFolder  # noqa: E402


def speedups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (config, tp, num_tokens) with ``speedup`` (NaN where not meaningful) and ``note``."""
    measured = table[table["status"] != "skipped"].copy()
    base = measured[measured["is_baseline"].astype(bool) & (measured["status"] == "ok")]
    base = base[["tp", "num_tokens", "latency_ms"]].rename(columns={"latency_ms": "baseline_ms"})
    merged = measured.merge(base, on=["tp", "num_tokens"], how="left")
    notes, values = [], []
    for _, row in merged.iterrows():
        enabled = [f for f in FUSION_FLAGS if _on(row.get(f))]
        active = _active(row, enabled)
        unfired = [f for f in active if not row.get(f"matches_{f}", 0)]
        out_of_range = [f for f in enabled if f not in active]
        # Off at this size because of its threshold, or (SP, AsyncTP) because num_tokens does not split over TP.
        why_off = "off, num_tokens does not split over TP" \
            if str(row.get("compile_range", "")).endswith(f"/{INDIVISIBLE}") else "outside its range"
        if row["status"] != "ok":
            note, value = row["status"], float("nan")
        elif pd.isna(row["baseline_ms"]):
            note, value = "no baseline", float("nan")
        elif unfired:
            note, value = f"did not fire: {', '.join(unfired)}", float("nan")
        elif enabled and not active:
            note, value = f"outside the num_tokens range of {', '.join(out_of_range)}", float("nan")
            if why_off != "outside its range":
                note = f"{why_off}: {', '.join(out_of_range)}"
        else:
            note = f"{why_off}: {', '.join(out_of_range)}" if out_of_range else ""
            value = row["baseline_ms"] / row["latency_ms"]
        notes.append(note)
        values.append(value)
    merged["speedup"], merged["note"] = values, notes
    # The config's own spread, as speedups: baseline median over the config's p90 (low) and p10 (high).
    merged["speedup_low"] = merged["speedup"] * merged["latency_ms"] / merged["latency_ms_p90"]
    merged["speedup_high"] = merged["speedup"] * merged["latency_ms"] / merged["latency_ms_p10"]
    return merged


def _active(row, enabled: list[str]) -> list[str]:
    """The enabled fusions the row's num_tokens range compiled with (all of them in rows from before ranges)."""
    recorded = row.get("active_passes")
    if not isinstance(recorded, str):
        return enabled
    return [f for f in enabled if f in recorded.split(",")]


def _on(value) -> bool:
    return bool(value) and not (isinstance(value, float) and pd.isna(value))


def _matches_text(row) -> str:
    enabled = [f for f in FUSION_FLAGS if _on(row.get(f))]
    active = _active(row, enabled)
    parts = [f"{f}={int(row[f'matches_{f}'])}" if f in active else f"{f}=out of range" for f in enabled]
    return ", ".join(parts) or "-"


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    folder = RunFolder(run_dir)
    table = folder.table()
    if table.empty:
        raise ValueError(f"{folder.path} holds no results yet")
    data = speedups(table)
    md_path, png_path = folder.path / "report.md", folder.path / "speedup.png"
    name = table["sweep"].iloc[0]
    lines = [f"# fusiontune report: {name}", ""]
    device = next((d for d in table.get("device", pd.Series(dtype=str)).dropna() if d), "unknown device")
    lines += [f"Device: {device}. Speedup = all-off median latency / config median latency (same TP, "
              "num_tokens); shown only for configs that ran, matched the baseline's output within tolerance, "
              "and whose enabled fusions all fired (a fusion outside its num_tokens range at a size is named, "
              "not counted as unfired).", ""]
    for tp, by_tp in data.groupby("tp"):
        lines += [f"## TP={tp}", "", "| config | num_tokens | median ms (p10-p90) | speedup | matches | max abs err | status |",
                  "|---|---:|---:|---:|---|---:|---|"]
        for _, row in by_tp.sort_values(["is_baseline", "label", "num_tokens"], ascending=[False, True, True]).iterrows():
            speed = f"{row['speedup']:.3f}x" if pd.notna(row["speedup"]) else (row["note"] or "-")
            if pd.notna(row["speedup"]) and row["note"]:  # e.g. a fusion outside its num_tokens range here
                speed += f" ({row['note']})"
            latency = (f"{row['latency_ms']:.3f} ({row['latency_ms_p10']:.3f}-{row['latency_ms_p90']:.3f})"
                       if pd.notna(row.get("latency_ms")) else "-")
            err = f"{row['max_abs_err']:.3g}" if pd.notna(row.get("max_abs_err")) else "-"
            lines.append(f"| {row['label']} | {int(row['num_tokens'])} | {latency} | {speed} | "
                         f"{_matches_text(row)} | {err} | {row['status']} |")
        lines.append("")
    skipped = table[table["status"] == "skipped"].drop_duplicates(["tp", "label"])
    if len(skipped):
        lines += ["## Skipped", ""] + [f"- TP={r.tp}, {r.label}: {r.error}" for r in skipped.itertuples()] + [""]
    failed = table[table["status"].isin(["failed", "incorrect"])].drop_duplicates(["tp", "label", "status"])
    if len(failed):
        lines += ["## Failed or incorrect", ""]
        lines += [f"- TP={r.tp}, {r.label}: {r.status}: {str(r.error).splitlines()[0] if r.error else ''}"
                  for r in failed.itertuples()] + [""]
    lines += [f"![speedup against num_tokens]({png_path.name})", ""]
    md_path.write_text("\n".join(lines))
    _plot(data, png_path, name)
    return md_path, png_path


def _plot(data: pd.DataFrame, path: Path, title: str) -> None:
    tps = sorted(data["tp"].unique())
    fig, axes = plt.subplots(1, len(tps), figsize=(6 * len(tps), 4.2), squeeze=False, sharey=True)
    for ax, tp in zip(axes[0], tps):
        by_tp = data[(data["tp"] == tp) & ~data["is_baseline"].astype(bool)]
        for label, rows in by_tp.groupby("label"):
            rows = rows.sort_values("num_tokens")
            spread = [rows["speedup"] - rows["speedup_low"], rows["speedup_high"] - rows["speedup"]]
            ax.errorbar(rows["num_tokens"], rows["speedup"], yerr=spread, marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xscale("log", base=2)
        sizes = sorted(data["num_tokens"].unique())
        ax.set_xticks(sizes, [str(int(n)) for n in sizes])
        ax.set_xlabel("num_tokens")
        ax.set_title(f"TP={tp}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speedup over all fusions off")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"{title}: speedup against num_tokens, bars = the config's p10-p90\n"
                 "(missing points: failed, incorrect or did not fire)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)

