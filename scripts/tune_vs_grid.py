"""Does the tuner find the grid's optimum with a quarter of its cost? Runs a tune file as a grid (every
combination) and as an Optuna study capped at a quarter of the grid's measured configs, then judges the study's
pick by the grid's own measurement of that config (the same session measured every candidate), against the noise
floor of the objective.

    python scripts/tune_vs_grid.py sweeps/tune-cpu.yaml --out results/tune-vs-grid
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table


def tune(tune_file: str, out: Path, *extra: str) -> dict:
    subprocess.run(["fusiontune", "tune", tune_file, "--out", str(out), *extra], check=True)
    return json.loads((out / "tune.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tune_file")
    parser.add_argument("--out", type=Path, default=Path("results/tune-vs-grid"))
    parser.add_argument("--trials", type=int, default=None, help="trials for the study [default: the grid size]")
    args = parser.parse_args()
    grid = tune(args.tune_file, args.out / "grid", "--grid")
    budget = max(1, grid["evaluations"] // 4)
    study = tune(args.tune_file, args.out / "study", "--max-evaluations", str(budget),
                 "--trials", str(args.trials or grid["grid_size"]))
    grid_trials = optuna.load_study(study_name=grid["study"],
                                    storage=f"sqlite:///{(args.out / 'grid' / 'study.db').resolve()}").trials
    by_config = {t.user_attrs.get("config_id"): t.value for t in grid_trials if t.value is not None}
    picked = study["best"]["config_id"]
    picked_on_grid = by_config.get(picked)
    best = grid["best"]["expected_ratio"]
    floor = max(f for f in (grid["noise_floor"], study["noise_floor"]) if f is not None)
    regret = picked_on_grid / best - 1 if picked_on_grid is not None else float("nan")
    table = Table(title=f"{args.tune_file}: the study against the grid (objective: expected latency / all-off)")
    for column in ("", "configs measured", "best (own run)", "study's pick, as the grid measured it", "noise floor"):
        table.add_column(column, justify="right")
    table.add_row("grid", str(grid["evaluations"]), f"{best:.4f}", "", f"{grid['noise_floor']:.2%}")
    table.add_row(f"study (cap {budget})", str(study["evaluations"]), f"{study['best']['expected_ratio']:.4f}",
                  f"{picked_on_grid:.4f} ({regret:+.2%} from the grid's best)" if picked_on_grid else "not on grid",
                  f"{study['noise_floor']:.2%}")
    Console().print(table)
    verdict = "within" if regret <= floor else "outside"
    Console().print(f"the study's pick is {regret:+.2%} from the grid's optimum: {verdict} the noise floor "
                    f"({floor:.2%}), with {study['evaluations']} of the grid's {grid['evaluations']} measurements")
    (args.out / "tune-vs-grid.json").write_text(json.dumps(
        {"grid": grid, "study": study, "picked_on_grid": picked_on_grid, "regret": regret, "noise_floor": floor,
         "within_noise": regret <= floor}, indent=2) + "\n")


if __name__ == "__main__":
    main()
