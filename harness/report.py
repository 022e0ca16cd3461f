"""Speedup report of a run folder: ``report.md`` and the same as one self-contained ``report.html``, with
``speedup.png``, ``heatmap.png``, (with profiles) ``kernels.png`` and (for a tune run) the study's figures.

Speedup is the all-off baseline's median latency over the config's, at the same TP size and num_tokens. It is
shown only where it means something: the config ran (``ok``), matched the baseline's output, and every fusion it
enables actually fired (nonzero match count). Otherwise the cell says why there is no number.

The noise floor at a num_tokens is the larger of two things: how far the baseline's two measurements (first and
last in the sweep) disagree, and the half-width of the baseline median's 95% confidence interval, both relative.

A speedup is claimed ("faster", "slower") only when its interval excludes 1 and it is beyond the floor. The
interval comes from the two medians' 95% confidence intervals (baseline's low over the config's high, and the
reverse), widened by the baseline's drift between its two measurements: what the same config moved by during the
run. Otherwise the verdict is "within noise". A config or baseline whose repeats scatter by more than
``NOISY_CV`` (a machine under load) is "too noisy", never claimed, whatever its median says. A config that ran at
lower SM clocks than its baseline says so.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fusiontune.kernels.library import KINDS  # noqa: E402
from fusiontune.passes.fusions import FUSION_FLAGS, PASSES_BY_FLAG  # noqa: E402
from fusiontune.passes.ranges import INDIVISIBLE  # noqa: E402

from .figures import pareto_plot, speedup_heatmap, tune_figures  # noqa: E402
from .results import KEY_COLUMNS, RunFolder  # noqa: E402


def noise_floor(table: pd.DataFrame) -> pd.DataFrame:
    """Per (tp, num_tokens): the baseline's two medians, their relative drift, its CI half-width, the floor; and
    the first baseline measurement's median CI (``base_ci_low``, ``base_ci_high``) and CV (``base_cv``), which a
    speedup's interval is made from."""
    ok = table[table["status"] == "ok"]
    first = ok[ok["is_baseline"].astype(bool)]
    again = ok[_flag(ok, "baseline_repeat")]
    keys = ["tp", "num_tokens"]
    floor = first[keys + ["latency_ms"]].rename(columns={"latency_ms": "baseline_ms"})
    floor["baseline_clock"] = _column(first, "gpu_sm_clock_mhz").values
    half_width = (_column(first, "latency_ms_ci_high") - _column(first, "latency_ms_ci_low")) / 2
    floor["ci_rel"] = (half_width / first["latency_ms"]).values
    floor["base_ci_low"] = _column(first, "latency_ms_ci_low").values
    floor["base_ci_high"] = _column(first, "latency_ms_ci_high").values
    floor["base_cv"] = _column(first, "latency_ms_cv").values
    again = again.assign(again_clock=_column(again, "gpu_sm_clock_mhz"))
    floor = floor.merge(again[keys + ["latency_ms", "again_clock"]].rename(columns={"latency_ms": "again_ms"}),
                        on=keys, how="left")
    pair = floor[["baseline_ms", "again_ms"]]
    floor["drift_rel"] = (pair.max(axis=1, skipna=False) / pair.min(axis=1, skipna=False)) - 1
    floor["noise_floor"] = floor[["drift_rel", "ci_rel"]].max(axis=1, skipna=True)
    return floor


def _column(frame: pd.DataFrame, name: str, default=float("nan")) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index)


def _flag(frame: pd.DataFrame, name: str) -> pd.Series:
    """A boolean column that older rows may lack (or hold as missing): missing reads False."""
    return _column(frame, name, False).fillna(False).astype(bool)


# Repeats scattering more than this (coefficient of variation) mean a machine under load: no speedup is claimed.
NOISY_CV = 0.10
# An SM clock this much below the baseline's at the same size is reported beside the speedup.
CLOCK_DROP = 0.03
VERDICTS = ("faster", "slower", "within noise", "too noisy")
# speedups.parquet: one row per config (not all-off), TP size and num_tokens that has a speedup
SPEEDUP_COLUMNS = ("config_id", "label", "tp", "num_tokens", "speedup", "ci_low", "ci_high", "verdict", "note")


def speedups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (config, tp, num_tokens) with ``speedup`` (NaN where not meaningful), its interval
    (``ci_low``, ``ci_high``), its ``verdict`` (one of ``VERDICTS``, or empty where there is no speedup), ``note``
    and the ``noise_floor`` it is judged against."""
    measured = table[table["status"] != "skipped"].copy()
    merged = measured.merge(noise_floor(table), on=["tp", "num_tokens"], how="left")
    notes, values = [], []
    for _, row in merged.iterrows():
        enabled = _enabled(row)
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
    _judge(merged)
    return merged


def _judge(merged: pd.DataFrame) -> None:
    """Add each speedup's interval and verdict, and the notes that go with them (see the module doc)."""
    config_low = _column(merged, "latency_ms_ci_low").fillna(merged["latency_ms"])
    config_high = _column(merged, "latency_ms_ci_high").fillna(merged["latency_ms"])
    base_low = merged["base_ci_low"].fillna(merged["baseline_ms"])
    base_high = merged["base_ci_high"].fillna(merged["baseline_ms"])
    drift = 1 + _column(merged, "drift_rel").fillna(0.0)
    merged["ci_low"] = (base_low / config_high / drift).where(merged["speedup"].notna())
    merged["ci_high"] = (base_high / config_low * drift).where(merged["speedup"].notna())
    worst_cv = pd.concat([_column(merged, "latency_ms_cv"), merged["base_cv"]], axis=1).max(axis=1, skipna=True)
    floor = merged["noise_floor"].fillna(0.0)
    again = _flag(merged, "baseline_repeat")
    verdicts, notes = [], []
    for i, row in merged.iterrows():
        verdict, note = "", row["note"]
        if pd.notna(row["speedup"]) and not row["is_baseline"] and not again[i]:
            if worst_cv[i] > NOISY_CV:
                verdict, extra = "too noisy", f"too noisy to claim (CV {worst_cv[i]:.0%})"
            elif row["ci_low"] > 1 and row["speedup"] - 1 > floor[i]:
                verdict, extra = "faster", ""
            elif row["ci_high"] < 1 and 1 - row["speedup"] > floor[i]:
                verdict, extra = "slower", ""
            else:
                inside = abs(row["speedup"] - 1) <= floor[i]
                verdict, extra = "within noise", (f"within noise (+/-{floor[i]:.1%})" if inside else
                                                  "within noise (its interval covers 1)")
            clock, base_clock = row.get("gpu_sm_clock_mhz"), row.get("baseline_clock")
            if pd.notna(clock) and pd.notna(base_clock) and clock < base_clock * (1 - CLOCK_DROP):
                extra = "; ".join(filter(None, [extra, f"lower SM clock than all-off ({clock:.0f} against "
                                                       f"{base_clock:.0f} MHz)"]))
            note = "; ".join(filter(None, [extra, note]))
        elif pd.notna(row["speedup"]) and again[i]:
            note = f"the A/A check: all-off again, {abs(row['speedup'] - 1):.1%} off the first"
        verdicts.append(verdict)
        notes.append(note)
    merged["verdict"], merged["note"] = verdicts, notes


def pooled_runs(data: pd.DataFrame) -> pd.DataFrame:
    """Configs measured in several runs (``measure.runs``), pooled per (config, tp, num_tokens): the median of the
    runs' medians, the spread between runs (largest over smallest, less 1), and the speedup of the pooled median.
    Each run compiles and builds the model afresh, so the spread between runs is the noise a user deploying the
    config meets; one run's floor sees only part of it. Empty when no config ran more than once."""
    if "run" not in data:
        return pd.DataFrame()
    ok = data[(data["status"] == "ok") & ~data["is_baseline"].astype(bool) & ~_flag(data, "baseline_repeat")]
    ok = ok.assign(base_id=ok["config_id"].str.replace(r"-run\d+$", "", regex=True),
                   base_label=ok["label"].str.replace(r" \(run \d+\)$", "", regex=True))
    groups = ok.groupby(["base_id", "base_label", "tp", "num_tokens"])
    pooled = groups.agg(runs=("latency_ms", "size"), latency_ms=("latency_ms", "median"),
                        fastest=("latency_ms", "min"), slowest=("latency_ms", "max"),
                        baseline_ms=("baseline_ms", "first"), noise_floor=("noise_floor", "first"),
                        fired=("speedup", lambda v: bool(v.notna().all()))).reset_index()
    pooled = pooled[pooled["runs"] > 1]
    if pooled.empty:
        return pooled
    pooled["run_spread"] = pooled["slowest"] / pooled["fastest"] - 1
    pooled["speedup"] = (pooled["baseline_ms"] / pooled["latency_ms"]).where(pooled["fired"])
    band = pooled[["run_spread", "noise_floor"]].max(axis=1)
    pooled["beyond_noise"] = (pooled["speedup"] - 1).abs() > band
    return pooled


def _pooled_lines(pooled: pd.DataFrame) -> list[str]:
    if pooled.empty:
        return []
    lines = ["Runs pooled (the median of each run's median; the spread between runs is noise this run's floor "
             "does not see, and a speedup inside the larger of the two is marked):", "",
             "| config | num_tokens | runs | pooled median ms | spread between runs | speedup |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in pooled.sort_values(["base_label", "num_tokens"]).itertuples():
        speed = "did not fire or no baseline" if pd.isna(row.speedup) else (
            f"{row.speedup:.3f}x" + ("" if row.beyond_noise else " (within noise)"))
        lines.append(f"| {row.base_label} | {int(row.num_tokens)} | {row.runs} | {row.latency_ms:.3f} | "
                     f"{row.run_spread:.2%} | {speed} |")
    return lines + [""]


def _enabled(row) -> list[str]:
    """The fusions the row ran with that could match in its model: one with no pattern for the model's quant
    scheme or TP size (norm + quant in a bf16 model, switched on by the level) cannot fire, so its 0 matches say
    nothing against the speedup."""
    quant = row.get("model_quant")
    return [f for f in FUSION_FLAGS if _on(row.get(f)) and (
        not isinstance(quant, str) or PASSES_BY_FLAG[f].applicability(quant, int(row["tp"]))[0])]


def _active(row, enabled: list[str]) -> list[str]:
    """The enabled fusions the row's num_tokens range compiled with (all of them in rows from before ranges)."""
    recorded = row.get("active_passes")
    if not isinstance(recorded, str):
        return enabled
    return [f for f in enabled if f in recorded.split(",")]


def _on(value) -> bool:
    return bool(value) and not (isinstance(value, float) and pd.isna(value))


def _matches_text(row) -> str:
    enabled = _enabled(row)
    active = _active(row, enabled)
    parts = [f"{f}={int(row[f'matches_{f}'])}" if f in active else f"{f}=out of range" for f in enabled]
    return ", ".join(parts) or "-"


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    folder = RunFolder(run_dir)
    table = folder.table()
    if table.empty:
        raise ValueError(f"{folder.path} holds no results yet")
    missing = [c for c in KEY_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{folder.path} is not a fusiontune run: its rows lack {', '.join(missing)}")
    data = speedups(table)
    md_path, png_path = folder.path / "report.md", folder.path / "speedup.png"
    name = table["sweep"].iloc[0]
    lines = [f"# fusiontune report: {name}", ""]
    device = next((d for d in table.get("device", pd.Series(dtype=str)).dropna() if d), "unknown device")
    lines += [f"Device: {device}. Speedup = all-off median latency / config median latency (same TP, "
              "num_tokens); shown only for configs that ran, matched the baseline's output within tolerance, "
              "and whose enabled fusions all fired (a fusion outside its num_tokens range at a size is named, "
              "not counted as unfired). Beside it, its 95% interval (both medians' confidence intervals, widened "
              "by the baseline's drift). A speedup is claimed only when that interval excludes 1 and it is beyond "
              "the noise floor; otherwise it is labelled within noise, or too noisy where the repeats scatter by "
              f"more than {NOISY_CV:.0%}. The same as data: speedups.parquet.", ""]
    floors = noise_floor(table)
    for tp, by_tp in data.groupby("tp"):
        lines += [f"## TP={tp}", ""] + _noise_lines(floors[floors["tp"] == tp])
        lines += ["| config | num_tokens | median ms (p10-p90) | CV, repeats | speedup | matches | max abs err "
                  "| status |", "|---|---:|---:|---:|---:|---|---:|---|"]
        order = by_tp.assign(_first=~by_tp["is_baseline"].astype(bool))
        for _, row in order.sort_values(["_first", "label", "num_tokens"]).iterrows():
            speed = f"{row['speedup']:.3f}x" if pd.notna(row["speedup"]) else (row["note"] or "-")
            if row["verdict"] and round(row["ci_low"], 3) != round(row["ci_high"], 3):
                speed += f" [{row['ci_low']:.3f}-{row['ci_high']:.3f}]"
            if pd.notna(row["speedup"]) and row["note"]:  # within noise, too noisy, clocks, a fusion out of range
                speed += f" ({row['note']})"
            latency = (f"{row['latency_ms']:.3f} ({row['latency_ms_p10']:.3f}-{row['latency_ms_p90']:.3f})"
                       if pd.notna(row.get("latency_ms")) else "-")
            spread = (f"{row['latency_ms_cv']:.1%}, {int(row['repeats'])}" + ("" if row.get("settled") else
                      " (not settled)") if pd.notna(row.get("latency_ms_cv")) else "-")
            err = f"{row['max_abs_err']:.3g}" if pd.notna(row.get("max_abs_err")) else "-"
            lines.append(f"| {row['label']} | {int(row['num_tokens'])} | {latency} | {spread} | {speed} | "
                         f"{_matches_text(row)} | {err} | {row['status']} |")
        lines.append("")
        lines += _pooled_lines(pooled_runs(by_tp))
    skipped = table[table["status"] == "skipped"].drop_duplicates(["tp", "label"])
    if len(skipped):
        lines += ["## Skipped", ""] + [f"- TP={r.tp}, {r.label}: {r.error}" for r in skipped.itertuples()] + [""]
    failed = table[table["status"].isin(["failed", "incorrect"])].drop_duplicates(["tp", "label", "status"])
    if len(failed):
        lines += ["## Failed or incorrect", ""]
        lines += [f"- TP={r.tp}, {r.label}: {r.status}: {str(r.error).splitlines()[0] if r.error else ''}"
                  for r in failed.itertuples()] + [""]
    if data.empty:  # every config skipped: nothing to plot (and no figure of an earlier run left to mislead)
        png_path.unlink(missing_ok=True)
        lines += ["No config was measured: every one was skipped (see above).", ""]
    else:
        lines += [f"![speedup against num_tokens]({png_path.name})", ""]
        _plot(data, floors, png_path, name)
    heatmap = speedup_heatmap(data, folder.path / "heatmap.png", name)
    if heatmap:
        lines += [f"![speedup heatmap, configs x num_tokens]({heatmap.name})", ""]
    pareto = pareto_plot(table, folder.path / "pareto.png", name)
    if pareto:
        lines += [f"![decode throughput per sequence against per GPU]({pareto.name})", ""]
    lines += _tune_lines(folder.path)
    kernels = folder.kernels()
    if not kernels.empty:
        kernels_png = folder.path / "kernels.png"
        _plot_kernels(kernels, table, kernels_png, name)
        lines += ["## Where the time goes", "",
                  "Per-kernel time per forward on rank 0, filed by what each kernel does (profiled eagerly; the "
                  "table is kernels.parquet, the traces in traces/ open in Perfetto).", "",
                  f"![time per category]({kernels_png.name})", ""] + _category_tables(kernels, table)
    md_path.write_text("\n".join(lines))
    (folder.path / "report.html").write_text(to_html(lines, folder.path, name))
    records = data[data["verdict"] != ""]
    records[list(SPEEDUP_COLUMNS)].reset_index(drop=True).to_parquet(folder.path / "speedups.parquet", index=False)
    return md_path, png_path


def _tune_lines(run_dir: Path) -> list[str]:
    """A tune run's result and its study's figures."""
    from .per_range import for_tune_run  # it reads the noise floor from here

    summary_path = run_dir / "tune.json"
    if not summary_path.exists():
        return []
    summary = json.loads(summary_path.read_text())
    lines = ["## Tuning", "", f"Study `{summary['study']}` ({summary['mode']}): {summary['trials']} trials, "
             f"{summary['evaluations']} configs measured, {summary['pruned']} pruned, {summary['failed']} failed; "
             f"grid size {summary['grid_size']}."]
    best = summary.get("best")
    if best:
        floor = summary.get("noise_floor")
        lines += ["", f"Best: trial {best['trial']}, expected latency {best['expected_ratio']:.4f} of all-off "
                      f"({best['expected_speedup']:.3f}x" + (f", noise floor {floor:.2%})" if floor is not None
                                                             else ")") + f": `{best['pass_config']}`"]
    if summary.get("confirmed"):
        lines += ["", "The best configs measured again at the end, beside this run's baseline (the pick is made "
                      "here):", "", "| trial | study's value | measured again | config |", "|---:|---:|---:|---|"]
        lines += [f"| {c['trial']} | {c['study_value']:.4f} | {c['expected_ratio']:.4f} | "
                  f"{' '.join(f'{k}={v}' for k, v in c['params'].items())} |" for c in summary["confirmed"]]
    lines += _per_range_lines(for_tune_run(RunFolder(run_dir).table(), summary) or summary.get("per_range"))
    lines.append("")
    for figure in tune_figures(run_dir):
        lines += [f"![{figure.stem}]({figure.name})", ""]
    return lines


def _per_range_lines(plan: dict | None) -> list[str]:
    """The per-size plan: which config (and fusions) is fastest at each size, beyond noise, and how vLLM says it."""
    if not plan:
        return []
    lines = ["", "Per-range enables (the fastest measured config at each size where it beats the best one beyond "
                 f"noise): expected latency {plan['expected_ratio']:.4f} of all-off against "
                 f"{plan['single']['expected_ratio']:.4f} for the best single config "
                 f"({plan['gain_over_single']:+.2%}).", "",
             "| num_tokens | weight | fusions | speedup | config | beyond noise? |", "|---:|---:|---|---:|---|---|"]
    for size in plan["sizes"]:
        lines.append(f"| {size['num_tokens']} | {size['weight']:.2f} | {', '.join(size['fusions']) or 'none'} | "
                     f"{size['speedup']:.3f}x | {size['label']} | "
                     f"{'yes: departs from the best config' if size['departs'] else 'best config kept'} |")
    said = "vLLM can express it" if plan["expressible"] else "vLLM cannot express all of it"
    lines += ["", f"{said}: `{plan['pass_config']}`"] + [f"- {note}" for note in plan["notes"]]
    return lines


def to_html(lines: list[str], run_dir: Path, title: str) -> str:
    """report.md as one self-contained HTML page (figures inlined), for the subset of Markdown it is written in:
    headings, pipe tables, images, bullets and paragraphs."""
    body, table = [], []

    def flush_table():
        if table:
            cells = [[html.escape(c.strip()) for c in row.strip().strip("|").split("|")] for row in table]
            head, rows = cells[0], [r for r in cells[1:] if not set("".join(r)) <= set("-: ")]
            body.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
        if image and (run_dir / image.group(2)).exists():
            data = base64.b64encode((run_dir / image.group(2)).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(image.group(1))}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{html.escape(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "figcaption{color:#666;font-size:12px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _category_tables(kernels: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Per TP size and num_tokens: microseconds per forward by category (rows) and config (columns)."""
    rank0 = kernels[kernels["rank"] == 0]
    labels = table.drop_duplicates("config_id").set_index("config_id")["label"]
    lines = []
    for (tp, size), here in rank0.groupby(["tp", "num_tokens"]):
        wide = here.pivot_table(index="category", columns="config_id", values="us_per_forward", aggfunc="sum")
        wide = wide.reindex([c for c in KINDS if c in wide.index]).fillna(0.0)
        wide.loc["total"] = wide.sum()
        ids = sorted(wide.columns, key=lambda c: (not str(labels.get(c, "")).startswith("all fusions off"),
                                                  str(labels.get(c, c))))
        lines += [f"TP={tp}, num_tokens={int(size)} (us per forward):", "",
                  "| category | " + " | ".join(str(labels.get(c, c)) for c in ids) + " |",
                  "|---|" + "---:|" * len(ids)]
        lines += [f"| {category} | " + " | ".join(f"{wide.at[category, c]:.1f}" for c in ids) + " |"
                  for category in wide.index]
        lines.append("")
    return lines


def _noise_lines(floors: pd.DataFrame) -> list[str]:
    if floors.empty:
        return []
    clocks = floors["baseline_clock"].notna().any()
    lines = ["Noise floor (all-off measured first and again last):", "",
             "| num_tokens | all-off ms | again ms | drift | median 95% CI | floor |" + (" SM clock MHz |" if clocks
                                                                                     else ""),
             "|---:|---:|---:|---:|---:|---:|" + ("---:|" if clocks else "")]
    for row in floors.sort_values("num_tokens").itertuples():
        again = f"{row.again_ms:.4f}" if pd.notna(row.again_ms) else "not measured"
        drift = f"{row.drift_rel:.2%}" if pd.notna(row.drift_rel) else "-"
        ci = f"+/-{row.ci_rel:.2%}" if pd.notna(row.ci_rel) else "-"
        floor = f"{row.noise_floor:.2%}" if pd.notna(row.noise_floor) else "-"
        clock = f" {row.baseline_clock:.0f} / {row.again_clock:.0f} |" if clocks else ""
        lines.append(f"| {int(row.num_tokens)} | {row.baseline_ms:.4f} | {again} | {drift} | {ci} | {floor} |{clock}")
    return lines + [""]


def _plot(data: pd.DataFrame, floors: pd.DataFrame, path: Path, title: str) -> None:
    tps = sorted(data["tp"].unique())
    fig, axes = plt.subplots(1, len(tps), figsize=(6 * len(tps), 4.2), squeeze=False, sharey=True)
    for ax, tp in zip(axes[0], tps):
        by_tp = data[(data["tp"] == tp) & ~data["is_baseline"].astype(bool)
                     & ~_flag(data, "baseline_repeat")]
        for label, rows in by_tp.groupby("label"):
            rows = rows.sort_values("num_tokens")
            spread = [(rows["speedup"] - rows["ci_low"]).clip(lower=0),
                      (rows["ci_high"] - rows["speedup"]).clip(lower=0)]
            ax.errorbar(rows["num_tokens"], rows["speedup"], yerr=spread, marker="o", capsize=3, label=label)
        band = floors[floors["tp"] == tp].sort_values("num_tokens").dropna(subset=["noise_floor"])
        if len(band):
            ax.fill_between(band["num_tokens"], 1 - band["noise_floor"], 1 + band["noise_floor"], color="grey",
                            alpha=0.2, label="noise floor")
        ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        sizes = sorted(data["num_tokens"].unique())
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)  # set before the log scale: a run with no speedup plots none
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(int(n)) for n in sizes])
        ax.set_xlabel("num_tokens")
        ax.set_title(f"TP={tp}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speedup over all fusions off")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"{title}: speedup against num_tokens, bars = its 95% interval, grey = noise floor\n"
                 "(missing points: failed, incorrect or did not fire)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_kernels(kernels: pd.DataFrame, table: pd.DataFrame, path: Path, title: str, max_sizes: int = 4) -> None:
    """Per TP size and num_tokens (up to ``max_sizes``, spread over the sweep's range): a horizontal stacked
    bar per config of rank 0's time per forward by category, all-off on top."""
    rank0 = kernels[kernels["rank"] == 0]
    per = rank0.groupby(["tp", "num_tokens", "config_id", "category"])["us_per_forward"].sum().reset_index()
    labels = table.drop_duplicates("config_id").set_index("config_id")["label"]
    baseline_ids = set(table.loc[table["is_baseline"].astype(bool), "config_id"])
    categories = [c for c in KINDS if c in set(per["category"])]
    colours = dict(zip(categories, plt.get_cmap("tab20").colors))
    tps = sorted(per["tp"].unique())
    sizes = sorted(per["num_tokens"].unique())
    if len(sizes) > max_sizes:
        sizes = [sizes[round(i * (len(sizes) - 1) / (max_sizes - 1))] for i in range(max_sizes)]
    configs = max(1, per["config_id"].nunique())
    height = len(tps) * (1.2 + 0.35 * configs) + 1.3
    fig, axes = plt.subplots(len(tps), len(sizes), figsize=(4.5 * len(sizes), height), squeeze=False)
    for i, tp in enumerate(tps):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            here = per[(per["tp"] == tp) & (per["num_tokens"] == size)]
            wide = here.pivot_table(index="config_id", columns="category", values="us_per_forward", aggfunc="sum")
            wide = wide.reindex(columns=categories).fillna(0.0)
            wide = wide.loc[sorted(wide.index, key=lambda c: (c not in baseline_ids, str(labels.get(c, c))))][::-1]
            left = pd.Series(0.0, index=wide.index)
            for category in categories:
                ax.barh([_short(labels.get(c, c)) for c in wide.index], wide[category], left=left,
                        color=colours[category], label=category)
                left += wide[category]
            ax.set_title(f"TP={tp}, num_tokens={int(size)}", fontsize=9)
            ax.set_xlabel("us per forward")
            ax.tick_params(axis="y", labelsize=7)
            if j:
                ax.set_yticklabels([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in categories]
    fig.legend(handles, categories, loc="lower center", ncol=min(6, len(categories)), fontsize=8)
    fig.suptitle(f"{title}: where the time goes (rank 0, eager profile)", fontsize=10)
    fig.tight_layout(rect=(0, (0.3 + 0.2 * (len(categories) // 6 + 1)) / height, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."
