"""Speedup report of a run folder: ``report.md`` and the same as one self-contained ``report.html``, with
``speedup.png``, ``heatmap.png``, (with profiles) ``kernels.png`` and (for a tune run) the study's figures. The
numbers come from ``analysis`` (what a speedup is, when it is claimed, the noise floor); this module only renders
them, and the figures are drawn by ``figures``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from fusiontune.kernels.library import CATEGORIES

from .analysis import (BUSY_HOST_CPUS, CLOCK_DROP, NOISY_CV, SPEEDUP_COLUMNS, active_fusions, enabled_fusions, flag,
                       noise_floor, pooled_runs, speedups)
from .figures import kernel_plot, pareto_plot, speedup_heatmap, speedup_plot, tune_figures
from .results import RunFolder
from .rows import KEY_COLUMNS


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


def _baseline_lines(by_tp: pd.DataFrame) -> list[str]:
    """Which kernels all-off ran, size by size (rows record them): a speedup is only as strong as its baseline."""
    base = by_tp[by_tp["is_baseline"].astype(bool) & ~flag(by_tp, "baseline_repeat")].sort_values("num_tokens")
    parts = []
    for column, what in (("attention_used", "attention"), ("gemm_used", "FP8 GEMM"), ("allreduce_used", "all-reduce")):
        spans: list[list] = []  # [what ran, first num_tokens, last num_tokens]
        for num_tokens, used in zip(base["num_tokens"], base.get(column, pd.Series(dtype=str))):
            if not isinstance(used, str) or not used:
                continue
            if spans and spans[-1][0] == used:
                spans[-1][2] = num_tokens
            else:
                spans.append([used, num_tokens, num_tokens])
        if spans:
            parts.append(f"{what}: " + ", ".join(f"{used} at {first}" + (f"-{last}" if last != first else "")
                                                 + " tokens" for used, first, last in spans))
    return [f"All-off ran (what every speedup here is against): {'; '.join(parts)}.", ""] if parts else []


def _matches_text(row) -> str:
    enabled = enabled_fusions(row)
    active = active_fusions(row, enabled)
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
    limits = table["gpu_power_limit_w"].dropna() if "gpu_power_limit_w" in table else pd.Series(dtype=float)
    if not limits.empty:  # a capped machine is not another of its kind
        device += (f", power limit {limits.min():.0f} W" if limits.min() == limits.max() else
                   f", power limit {limits.min():.0f}-{limits.max():.0f} W (it changed during the run)")
    lines += [f"Device: {device}. Speedup = all-off median latency / config median latency (same TP, "
              "num_tokens); shown only for configs that ran, matched the baseline's output within tolerance, "
              "and whose enabled fusions all fired (a fusion outside its num_tokens range at a size is named, "
              "not counted as unfired). Beside it, its 95% interval (both medians' confidence intervals, widened "
              "by the baseline's drift). A speedup is claimed only when that interval excludes 1 and it is beyond "
              "the noise floor; otherwise it is labelled within noise. A measurement that cannot carry a claim is "
              f"labelled and never claimed: too noisy (repeats scattering by more than {NOISY_CV:.0%}), busy host "
              f"({BUSY_HOST_CPUS:g} or more CPUs busy with other work while a host-bound timing ran), not "
              "settled (the median's interval stayed wider than measure.settle; raise measure.max_repeats), lower "
              f"clocks (the config's SM clock {CLOCK_DROP:.0%} or more below all-off's). The same as data: "
              "speedups.parquet.", ""]
    if "paired_speedup" in table and table["paired_speedup"].notna().any():
        lines += ["Paired rows (measure.paired): each config was timed in shared rounds with all-off in one "
                  "process, the order shuffled every round (on GPUs, each round on fresh CUDA-graph captures); its "
                  "speedup is the median of the rounds' all-off / config ratios, its interval the median's 95% "
                  "interval over rounds, and it is claimed when that interval excludes 1. The A/A check is all-off "
                  "again paired with all-off.", ""]
    floors = noise_floor(table)
    for tp, by_tp in data.groupby("tp"):
        lines += [f"## TP={tp}", ""] + _noise_lines(floors[floors["tp"] == tp]) + _baseline_lines(by_tp)
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
        speedup_plot(data, floors, png_path, name)
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
        kernel_plot(kernels, table, kernels_png, name)
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
        if summary.get("unconfirmed"):
            lines += ["", "Unconfirmed: the study's best value, over its runs, not measured again in one run (the "
                          "tune stopped before its final check; run it again to confirm)."]
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
    """report.md as one self-contained HTML page: the Markdown rendered by markdown-it (CommonMark with pipe
    tables; any HTML in the text is escaped, not passed through), each figure of the run folder inlined as a data
    URL with its caption."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = renderer.renderer.rules["image"]

    def figure(_renderer, tokens, idx, options, env):  # markdown-it binds a rule as a method
        token = tokens[idx]
        path = run_dir / str(token.attrGet("src"))
        if not (path.is_file() and path.resolve().parent == run_dir.resolve()):
            return default_image(tokens, idx, options, env)
        alt = html.escape(token.content)
        data = base64.b64encode(path.read_bytes()).decode()
        return (f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption>'
                "</figure>")

    renderer.add_render_rule("image", figure)
    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}figcaption{color:#666;font-size:12px}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{renderer.render(chr(10).join(lines))}</body></html>\n")


def _category_tables(kernels: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Per TP size and num_tokens: microseconds per forward by category (rows) and config (columns)."""
    rank0 = kernels[kernels["rank"] == 0]
    labels = table.drop_duplicates("config_id").set_index("config_id")["label"]
    lines = []
    for (tp, size), here in rank0.groupby(["tp", "num_tokens"]):
        wide = here.pivot_table(index="category", columns="config_id", values="us_per_forward", aggfunc="sum")
        wide = wide.reindex([c for c in CATEGORIES if c in wide.index]).fillna(0.0)
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
