"""The report's figures, all of them: speedup against num_tokens with its intervals and the noise floor, a heatmap
of configs x num_tokens, where the time goes per kernel category, the decode Pareto plot, and a tune study's
history and parameter importances (Optuna's own matplotlib plots)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fusiontune.kernels.library import CATEGORIES  # noqa: E402

from .analysis import UNCLAIMED, flag  # noqa: E402


def speedup_heatmap(data: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Speedup per config (rows) and num_tokens (columns), one panel per TP size. A cell not claimed (within
    noise, or one of ``UNCLAIMED``) is marked with "~", an empty cell had no meaningful speedup (failed, incorrect,
    did not fire)."""
    configs = data[~data["is_baseline"].astype(bool)]
    if configs.empty:
        return None
    tps = sorted(configs["tp"].unique())
    rows = max(configs[configs["tp"] == tp]["label"].nunique() for tp in tps)
    sizes = sorted(configs["num_tokens"].unique())
    longest = min(64, max(len(str(label)) for label in configs["label"]))
    fig, axes = plt.subplots(len(tps), 1, squeeze=False,
                             figsize=(2.0 + 0.065 * longest + 0.9 * len(sizes), 1.6 + 0.38 * rows * len(tps)))
    spread = float(np.nanmax(np.abs(configs["speedup"].to_numpy(dtype=float) - 1))) if configs["speedup"].notna().any() \
        else 0.05
    spread = max(spread, 0.01)
    for ax, tp in zip(axes[:, 0], tps):
        here = configs[configs["tp"] == tp]
        grid = here.pivot_table(index="label", columns="num_tokens", values="speedup", aggfunc="first")
        grid = grid.reindex(columns=sizes)
        verdicts = here.pivot_table(index="label", columns="num_tokens", values="verdict", aggfunc="first").reindex(
            index=grid.index, columns=sizes)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu", vmin=1 - spread, vmax=1 + spread, aspect="auto")
        for i, label in enumerate(grid.index):
            for j, size in enumerate(sizes):
                value = grid.iat[i, j]
                if pd.notna(value):
                    noisy = verdicts.iat[i, j] in ("within noise",) + UNCLAIMED
                    ax.text(j, i, f"{'~' if noisy else ''}{value:.3f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(sizes)), [str(int(s)) for s in sizes], fontsize=8)
        ax.set_yticks(range(len(grid.index)), [_short(label, 64) for label in grid.index], fontsize=7)
        ax.set_title(f"TP={tp}", fontsize=9)
        ax.set_xlabel("num_tokens", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.suptitle(f"{title}: speedup over all-off\n(~: within noise or not claimed; blank: no meaningful speedup)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long config labels: keep them whole
    plt.close(fig)
    return path


def tune_figures(run_dir: Path) -> list[Path]:
    """The study's optimisation history and parameter importances, if ``run_dir`` holds a tune run."""
    summary_path, db = run_dir / "tune.json", run_dir / "study.db"
    if not summary_path.exists() or not db.exists():
        return []
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # their plots: "experimental"
    summary = json.loads(summary_path.read_text())
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{db.resolve()}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    paths = []
    if complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        ax.set_ylabel("expected latency / all-off")
        paths.append(_save(ax.figure, run_dir / "tune-history.png"))
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(study)
            paths.append(_save(ax.figure, run_dir / "tune-importances.png"))
        except (RuntimeError, ValueError):  # every completed trial alike in some way Optuna cannot rank
            pass
    return paths


def _save(fig, path: Path) -> Path:
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(label: str, width: int = 42) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."


def pareto_plot(table: pd.DataFrame, path: Path, title: str) -> Path | None:
    """For decode sweeps (``model_decode_context`` > 0), the trade-off vLLM's ``plot_pareto`` draws: tokens/s per
    sequence (one token per step: 1000 / step ms) against tokens/s per GPU (num_tokens sequences per step, over
    the TP group), each config a curve over num_tokens, and the frontier no config beats on both."""
    if "model_decode_context" not in table or not (table["model_decode_context"].fillna(0) > 0).any():
        return None
    ok = table[(table["status"] == "ok") & table["latency_ms"].notna()].copy()
    if ok.empty:
        return None
    ok["per_user"] = 1000.0 / ok["latency_ms"]
    ok["per_gpu"] = ok["num_tokens"] * 1000.0 / ok["latency_ms"] / ok["tp"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, tp), rows in ok.groupby(["label", "tp"]):
        rows = rows.sort_values("num_tokens")
        ax.plot(rows["per_user"], rows["per_gpu"], marker="o", markersize=3, linewidth=1,
                label=_short(f"TP={tp} {label}", 60))
    frontier = _frontier(ok[["per_user", "per_gpu"]].to_numpy(dtype=float))
    ax.step(frontier[:, 0], frontier[:, 1], where="pre", color="black", linewidth=1.5, alpha=0.6,
            label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per sequence (1000 / step ms)")
    ax.set_ylabel("tokens/s per GPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{title}: decode throughput per sequence against per GPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _frontier(points: np.ndarray) -> np.ndarray:
    """The points no other point beats on both coordinates (higher is better), by falling x."""
    ordered = points[np.argsort(-points[:, 0])]
    front, best_y = [], -np.inf
    for x, y in ordered:
        if y > best_y:
            front.append((x, y))
            best_y = y
    return np.array(front[::-1])


def speedup_plot(data: pd.DataFrame, floors: pd.DataFrame, path: Path, title: str) -> None:
    tps = sorted(data["tp"].unique())
    fig, axes = plt.subplots(1, len(tps), figsize=(6 * len(tps), 4.2), squeeze=False, sharey=True)
    for ax, tp in zip(axes[0], tps):
        by_tp = data[(data["tp"] == tp) & ~data["is_baseline"].astype(bool)
                     & ~flag(data, "baseline_repeat")]
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

def kernel_plot(kernels: pd.DataFrame, table: pd.DataFrame, path: Path, title: str, max_sizes: int = 4) -> None:
    """Per TP size and num_tokens (up to ``max_sizes``, spread over the sweep's range): a horizontal stacked
    bar per config of rank 0's time per forward by category, all-off on top."""
    rank0 = kernels[kernels["rank"] == 0]
    per = rank0.groupby(["tp", "num_tokens", "config_id", "category"])["us_per_forward"].sum().reset_index()
    labels = table.drop_duplicates("config_id").set_index("config_id")["label"]
    baseline_ids = set(table.loc[table["is_baseline"].astype(bool), "config_id"])
    categories = [c for c in CATEGORIES if c in set(per["category"])]
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
                ax.barh([_short(labels.get(c, c), 38) for c in wide.index], wide[category], left=left,
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
