"""The ``fusiontune`` command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  epilog="Exit codes: 0 ok; 1 some configs failed or were incorrect, or a regression (compare); 2 bad "
                         "input; 130 interrupted (run --resume continues).")
console = Console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"fusiontune {version('fusiontune')}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      metavar="", help="Print fusiontune's version and exit.")):
    """Benchmark and tune vLLM-style torch.compile fusion passes on your model, GPUs and batch sizes."""


@app.command()
def run(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML (see sweeps/smoke-cpu.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: results/<sweep name>)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto', 'ray://host:10001'); "
                                          "overrides the sweep's cluster.address. Default: a local Ray."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar="",
                                 help="Print the expanded plan (and what was dropped) and exit."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the run in the output folder: configs "
                                "that finished are kept, failed and missing ones run (with their TP size's baseline)."),
    report: bool = typer.Option(True, "--report/--no-report", metavar="",
                                help="Write report.md and speedup.png at the end."),
    config_timeout: float = typer.Option(3600, min=1, help="Seconds one config (all its num_tokens) may take; past "
                                         "it the config is recorded failed, its workers are replaced, the sweep goes "
                                         "on."),
    groups: Optional[str] = typer.Option(None, "--groups", help="TP groups measuring at once: 'auto' or a number; "
                                         "overrides the sweep's cluster.groups."),
    num_runs: Optional[int] = typer.Option(None, "--num-runs", min=1, help="Measure every config this many times "
                                           "(run k of all configs before run k + 1); overrides measure.runs."),
    paired: Optional[bool] = typer.Option(None, "--paired/--unpaired", help="Time the configs of a TP size in "
                                          "shared rounds with all-off, or each alone; overrides measure.paired."),
):
    """Expand a sweep, run every config on Ray (one actor per TP rank), write results as they are measured."""
    from fusiontune.harness.sweep import SweepError, built_model, expand, load_sweep

    try:
        spec, text = load_sweep(sweep_file)
        spec = _override(spec, "cluster", groups=_groups(groups))
        spec = _override(spec, "measure", runs=num_runs, paired=paired)
        built_model(spec)  # a sweep that cannot be planned says so before any cluster is asked
    except SweepError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    from fusiontune.harness.results import RunFolder, completed_configs, measured_sizes, torn_tail

    run_dir = out or Path("results") / spec.name
    _writable(run_dir, "--out")
    plan = expand(spec, _workers_platform(spec.cluster, address))
    if resume:
        folder = RunFolder(run_dir)
        _check_same_sweep(folder, spec, sweep_file)
        if torn_tail(folder.rows_path):
            console.print(f"{folder.rows_path}: its last row was cut short (a crash mid-write); it is dropped and "
                          "its config runs again")
        rows = folder.rows()
        done = completed_configs(rows, spec.num_tokens)
        plan = plan.without(done, measured_sizes(rows))
        to_run = [c for c in plan.configs if not c.reference_only]
        partly = sum(bool(c.num_tokens) for c in to_run)
        console.print(f"resuming {run_dir}: {len(done)} configs already measured, {len(to_run)} to run"
                      + (f" ({partly} of them only at the sizes they lack)" if partly else "")
                      + (" (and the all-off outputs recomputed, untimed, to check them against)"
                         if len(to_run) < len(plan.configs) else ""))
    _print_plan(plan)
    if dry_run:
        return
    from fusiontune.harness.launcher import OtherMachine, run_plan

    folder = RunFolder(run_dir)
    moved = folder.begin(text, str(sweep_file), "sweep", resume,  # never overwrites results: an old run is kept
                         {"cluster_address": address or spec.cluster.address, "planned_on": plan.platform.hardware(),
                          "planned": len(plan.configs), "skipped": len(plan.skipped),
                          "dropped": [list(d) for d in plan.dropped]})
    if moved:
        console.print(f"{moved} (use --resume to continue a run instead)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as progress:
        measured = [c for c in plan.configs if not c.reference_only]
        task = progress.add_task("configs", total=len(measured))
        # (config, size) pairs: a paired batch's configs finish together after their last size, so this is what
        # moves while they are measured
        sizes = progress.add_task("sizes", total=sum(len(c.num_tokens or spec.num_tokens) for c in measured))

        def done(config, rows):
            statuses = sorted({r["status"] for r in rows})
            progress.console.print(f"TP={config.tp} {config.label}: {', '.join(statuses)}")
            progress.advance(task)

        def measured_rows(config, rows):
            progress.advance(sizes, len({(r["tp"], r["num_tokens"]) for r in rows}))

        try:
            run_plan(plan, folder, address=address, config_timeout_s=config_timeout, on_config=done,
                     on_rows=measured_rows)
        except ConnectionError as exc:
            _bad(f"--address / cluster.address: {exc}".splitlines()[0])
        except OtherMachine as exc:
            _bad(f"--resume: {exc}")
        except KeyboardInterrupt:
            console.print(f"interrupted: every config measured so far is in {folder.path}; "
                          f"`fusiontune run {sweep_file} --out {folder.path} --resume` continues")
            raise typer.Exit(130)
    folder.update_manifest(finished=True)
    console.print(f"results: {folder.parquet_path}")
    if report:
        from fusiontune.harness.report import write_report

        md, png = write_report(folder.path)
        console.print(f"report: {md}" + (f" and {png}" if png.exists() else ""))
    broken = _broken_configs(folder)
    if broken:
        console.print(f"[red]{len(broken)} config(s) failed or were incorrect:[/red] " + escape(", ".join(broken)))
        raise typer.Exit(1)


def _check_same_sweep(folder, spec, sweep_file: Path) -> None:
    """Refuse to resume a run folder with a sweep whose rows would not compare with the rows there."""
    from fusiontune.harness.sweep import SweepError, identity_differences, parse_sweep

    if not folder.manifest_path.exists():
        return
    manifest = folder.manifest()
    try:
        earlier = parse_sweep(manifest.get("sweep", ""), manifest.get("sweep_file", "the earlier sweep"))
    except SweepError:
        return  # a manifest from before this check, or hand-edited: nothing to compare against
    differences = identity_differences(earlier, spec)
    if differences or earlier.name != spec.name:
        what = ", ".join(differences) or "name"
        console.print(f"--resume: {folder.path} holds a run of {earlier.name} ({manifest.get('sweep_file')}); "
                      f"{sweep_file} ({spec.name}) differs in {what}, so their rows would mix. Use another --out, "
                      "or run without --resume (the earlier run is set aside).", markup=False)
        raise typer.Exit(2)


def _broken_configs(folder) -> list[str]:
    """The configs whose latest rows include a failed or incorrect size."""
    table = folder.table()
    if table.empty or "status" not in table:
        return []
    bad = table[table["status"].isin(["failed", "incorrect"])]
    return sorted({f"TP={row.tp} {row.label}" for row in bad.itertuples()})


@app.command()
def tune(
    tune_file: Path = typer.Argument(..., help="Tune YAML (see sweeps/tune-cpu.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: results/<tune name>); the study is "
                                       "kept there (study.db) unless study.storage names another."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Trials in all (the study's, resumed ones "
                                         "included); overrides study.trials."),
    grid: bool = typer.Option(False, "--grid", metavar="", help="Evaluate every combination (a study of its own): "
                              "the reference the tuner is judged against."),
    max_evaluations: Optional[int] = typer.Option(None, "--max-evaluations", min=1, help="Measure at most this many "
                                                  "configs; overrides study.max_evaluations."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join; default: a local Ray."),
    groups: Optional[str] = typer.Option(None, "--groups", help="TP groups running trials at once: 'auto' or a "
                                         "number; overrides cluster.groups."),
    config_timeout: float = typer.Option(3600, min=1, help="Seconds one trial's job may take before it is failed."),
    summarize: bool = typer.Option(False, "--summarize", metavar="", help="Measure nothing: write tune.json and "
                                   "report from the study as it stands (a tune stopped before its end writes none). "
                                   "Its best is marked unconfirmed: run the tune again to measure it once more."),
):
    """Search fusion enables and thresholds with Optuna for the lowest expected latency under a workload's
    num_tokens distribution; trials run on TP groups through Ray, the study resumes from its storage."""
    from fusiontune.harness.sweep import SweepError
    from fusiontune.harness.tune_spec import load_tune

    try:
        spec, text = load_tune(tune_file)
        spec = _override(spec, "cluster", groups=_groups(groups))
        spec = _override(spec, "study", max_evaluations=max_evaluations)
        from fusiontune.harness.results import RunFolder
        from fusiontune.harness.tuner import Tuner, check, grid_size, parameters

        where = out or Path("results") / spec.name
        _writable(where, "--out")
        weights = check(spec, tune_file.parent)  # a tune that cannot be planned says so before any cluster is asked
        if summarize:  # nothing runs: the trials' configs come from the study and the rows
            if not (where / "study.db").exists() and not spec.study.storage:
                raise SweepError(f"--summarize: {where} holds no study (study.db); name the tune's run folder with "
                                 "--out")
            platform = None
        else:  # a cluster that does not answer is said before any folder is made
            platform = _workers_platform(spec.cluster, address)
        folder = RunFolder(where)
        tuner = Tuner(spec, folder, grid=grid, trials=trials, address=address, timeout_s=config_timeout,
                      base_dir=tune_file.parent, platform=platform, weights=weights)
        if summarize:
            summary = tuner.summarize()
    except SweepError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    if summarize:
        _tune_said(summary, folder)
        return
    moved = folder.begin(text, str(tune_file), "tune-grid" if grid else "tune", True, {})
    if moved:
        console.print(moved)
    searched = ", ".join(name for name, _ in parameters(spec))
    console.print(f"tune {spec.name}: {'grid of' if grid else 'up to'} {tuner.trials} trials over {searched} "
                  f"(grid size {grid_size(spec)}); workload weights "
                  + ", ".join(f"{n}: {w:.2f}" for n, w in tuner.weights.items() if w > 0))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("trials", total=tuner.trials)

        def told(trial):
            value = f"{trial['value']:.4f}" if trial["value"] is not None else "-"
            progress.console.print(f"trial {trial['trial']}: {trial['state'].lower()} {value} "
                                   f"{'(same config as before) ' if not trial['measured'] else ''}{trial['params']}"
                                   + escape(f" [{trial['note'][:200]}]" if trial["note"] else ""))
            progress.advance(task)

        tuner.on_trial = told
        from fusiontune.harness.launcher import OtherMachine

        try:
            summary = tuner.run()
        except ConnectionError as exc:
            _bad(f"--address / cluster.address: {exc}".splitlines()[0])
        except OtherMachine as exc:
            _bad(f"the study in {folder.path}: {exc}")
        except SweepError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1)
    _tune_said(summary, folder)


def _tune_said(summary: dict, folder) -> None:
    best = summary["best"]
    console.print(f"{summary['trials']} trials, {summary['evaluations']} configs measured, {summary['pruned']} "
                  f"pruned, {summary['failed']} failed; summary: {folder.path / 'tune.json'}")
    if best:
        console.print(f"best: trial {best['trial']}, expected latency {best['expected_ratio']:.4f} of all-off "
                      f"({best['expected_speedup']:.3f}x): {best['params']}"
                      + (" (unconfirmed: not measured again in one run)" if summary.get("unconfirmed") else ""))


def _groups(groups: Optional[str]):
    """--groups as cluster.groups takes it: 'auto' or a number (None: not given)."""
    from fusiontune.harness.sweep import SweepError

    if groups is None or groups == "auto":
        return groups
    if not (groups.isdigit() and int(groups) > 0):
        raise SweepError(f"--groups takes 'auto' or a number >= 1, got {groups!r}")
    return int(groups)


def _writable(path: Path, option: str, folder: bool = True) -> None:
    """Refuse, in one line and before any work, an output that cannot be written: a file where a folder must go
    (or a folder where a file must), a file on the way to it, or a place this user cannot write."""
    if path.exists() and path.is_dir() != folder:
        _bad(f"{option} {path}: a {'file' if folder else 'folder'} is there; name a {'folder' if folder else 'file'}")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        _bad(f"{option} {path}: {existing} is a file, so nothing can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        _bad(f"{option} {path}: {existing} is not writable by this user; name a place you can write")


def _workers_platform(cluster, address: str | None):
    """What the workers run on, to plan for (``launcher.workers_platform``): a cluster is joined and asked; one
    where nothing answers is one line before any folder is made or any work starts."""
    from fusiontune.harness.launcher import workers_platform

    try:
        return workers_platform(cluster.device, address or cluster.address, cluster.dashboard)
    except ConnectionError as exc:
        _bad(f"--address / cluster.address: {exc}".splitlines()[0])


def _bad(message: str) -> None:
    console.print(message, style="red", markup=False)
    raise typer.Exit(2)


def _override(spec, section: str, **fields):
    """The spec with command-line values (those given, not None) in place of the file's ``section.<field>``."""
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return spec
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=given)})


def _plan_text(config) -> str:
    if config.reference_only:
        return "recompute all-off outputs (untimed; its rows exist)"
    if config.is_baseline:
        return "run (baseline)"
    what = "run (baseline again, last: the noise floor)" if config.baseline_repeat else "run"
    return f"{what}, at num_tokens {list(config.num_tokens)} (the sizes it lacks)" if config.num_tokens else what


def _print_plan(plan) -> None:
    table = Table(title=f"sweep {plan.spec.name}: {plan.model.name}, quant={plan.model.quant}, "
                        f"num_tokens={plan.spec.num_tokens}, O{plan.spec.optimization_level}, planned for "
                        f"{plan.platform.hardware()}")
    for column in ("TP", "config", "id", "plan"):
        table.add_column(column)
    for c in plan.configs:
        table.add_row(str(c.tp), c.label, c.config_id, _plan_text(c))
    for s in plan.skipped:
        table.add_row(str(s.tp), s.label, "", f"[yellow]skipped[/yellow]: {s.reason}")
    for label, tp, why in plan.dropped:
        table.add_row(str(tp), label, "", f"[dim]dropped: {why}[/dim]")
    console.print(table)
    if plan.spec.measure.paired and any(not c.is_baseline for c in plan.configs):
        console.print("measure.paired: after all-off, each TP size's configs are timed in batches (one per TP "
                      "group) in shared rounds with all-off; --unpaired times each alone")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by 'fusiontune run'.")):
    """Write report.md (speedup over all-off, with match counts) and speedup.png into RUN_DIR."""
    from fusiontune.harness.report import write_report

    if not (run_dir / "rows.jsonl").exists() and not (run_dir / "results.parquet").exists():
        console.print(f"[red]{run_dir} is not a run folder (no rows.jsonl or results.parquet)[/red]")
        raise typer.Exit(2)
    try:
        md, png = write_report(run_dir)
    except ValueError as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(2)
    console.print(f"report: {md}" + (f" and {png}" if png.exists() else ""))


def _check_quant(quant: str) -> None:
    from fusiontune.harness.model import QUANT_CHOICES

    if quant not in QUANT_CHOICES:
        _bad(f"--quant {quant!r}: choose one of {', '.join(QUANT_CHOICES)}")


def _platform(vendor: str, capability: Optional[int], tp: int, hidden_size: int, quant: str,
              flashinfer: Optional[bool]):
    """This machine (``vendor='detect'``) or the one the options describe."""
    from fusiontune.passes.platform import Platform

    if vendor not in VENDORS:
        _bad(f"--vendor {vendor!r}: choose one of {', '.join(VENDORS)}")
    _check_quant(quant)
    platform = Platform.detect(tp, hidden_size, quant=quant)
    if vendor != "detect":
        platform = platform.with_(vendor=vendor, capability=capability)
    if flashinfer is not None:
        platform = platform.with_(flashinfer=flashinfer)
    return platform


VENDORS = ("detect", "cuda", "rocm", "cpu")
VENDOR_OPTION = typer.Option("detect", help="cuda, rocm, cpu, or detect (this machine).")
CAPABILITY_OPTION = typer.Option(None, min=10, max=199, help="Compute capability as 90 (sm90), 100 (sm100).")
VLLM_VERSION_OPTION = typer.Option(None, "--vllm-version", help="The vLLM release the flags are for, e.g. 0.33 "
                                   "(default: the newest in passes/vllm_versions.py); only fields it accepts are "
                                   "written.")
TP_OPTION = typer.Option(1, min=1, help="Tensor-parallel size.")
HIDDEN_OPTION = typer.Option(4096, min=1, help="Model hidden size.")
QUANT_OPTION = typer.Option("none", help="Model quant scheme (none, fp8-static, fp8-per-token, fp8-per-group).")
FLASHINFER_OPTION = typer.Option(None, help="Whether FlashInfer is installed (default: detect).")


@app.command("resolve")
def resolve_cmd(
    level: int = typer.Option(2, "-O", "--level", min=0, max=3, help="Optimization level 0-3."),
    vendor: str = VENDOR_OPTION,
    capability: Optional[int] = CAPABILITY_OPTION,
    tp: int = TP_OPTION,
    hidden_size: int = HIDDEN_OPTION,
    quant: str = QUANT_OPTION,
    flashinfer: Optional[bool] = FLASHINFER_OPTION,
    set_: list[str] = typer.Option([], "--set", help="A user field, FIELD=VALUE (repeatable)."),
):
    """Show the PassConfig an optimization level resolves to on a platform, and why each field has its value."""
    import yaml

    from fusiontune.passes.config import PassConfigError, resolve

    platform = _platform(vendor, capability, tp, hidden_size, quant, flashinfer)
    user = {}
    for item in set_:
        if "=" not in item:
            console.print(f"[red]--set takes FIELD=VALUE, got {item!r}[/red]")
            raise typer.Exit(2)
        key, value = item.split("=", 1)
        user[key] = yaml.safe_load(value)
    try:
        resolved = resolve(user, level, platform)
    except (PassConfigError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    table = Table(title=f"PassConfig at O{level} on {platform.describe()}")
    for column in ("field", "value", "from", "why"):
        table.add_column(column)
    for name, value, source, why in resolved.explain():
        table.add_row(name, str(value), source, why)
    console.print(table)


@app.command("passes")
def passes_cmd(
    vendor: str = VENDOR_OPTION,
    capability: Optional[int] = CAPABILITY_OPTION,
    tp: int = TP_OPTION,
    hidden_size: int = HIDDEN_OPTION,
    quant: str = QUANT_OPTION,
    flashinfer: Optional[bool] = FLASHINFER_OPTION,
):
    """Every fusion: its flag, what it fuses, its num_tokens range, its default at O0-O3, and whether it can run
    on this machine (or the one the options describe), and why not."""
    from fusiontune.passes.config import resolve
    from fusiontune.passes.fusions import LEVELS, PASSES

    platform = _platform(vendor, capability, tp, hidden_size, quant, flashinfer)
    resolved = {level: resolve({}, level, platform) for level in LEVELS}
    table = Table(title=f"fusion passes on {platform.describe()}", show_lines=True)
    table.add_column("flag", no_wrap=True)
    for column in ("fuses", "range (O2 thresholds)", *(f"O{level}" for level in LEVELS), "runs here?"):
        table.add_column(column)
    for spec in PASSES:
        defaults = ["on" if resolved[level].values[spec.flag] else "off" for level in LEVELS]
        applicable, why = spec.applicability(platform.quant, platform.tp_size)
        if not applicable:
            here = f"[yellow]no[/yellow]: {why}"
        else:
            level_on = next((level for level in LEVELS if resolved[level].values[spec.flag]), None)
            here = "yes" + (f" (on from O{level_on})" if level_on is not None else
                            f" (off at every level here: {resolved[3].reasons[spec.flag]}; set it to run it)")
        table.add_row(spec.flag, spec.fuses, spec.range_text(resolved[2].values, platform), *defaults, here)
    console.print(table)


@app.command("bench-kernels")
def bench_kernels(
    hidden: list[int] = typer.Option([], "--hidden", min=1, help="Hidden sizes (repeatable) (default: 2880 4096 8192 14336; "
                                     "with --tp: 4096 8192)."),
    tokens: list[int] = typer.Option([], "--tokens", min=1, help="num_tokens values (repeatable) (default: 1 16 64 512 4096 "
                                     "16384; with --tp: 1 8 64 256 1024 4096 16384)."),
    op: list[str] = typer.Option([], "--op", help="Only these ops (repeatable), e.g. rms_norm->fp8-static, or with "
                                 "--tp allreduce+add+rms_norm."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 or float16 (the collective cases run bfloat16)."),
    tp: int = typer.Option(1, "--tp", min=1, help="Above 1: the collective cases (fused all-reduce + norm, AsyncTP's "
                           "GEMM + collective) on this many GPUs, one process each (default: 1, the row kernels)."),
    csv_path: Path = typer.Option(Path("bench-kernels.csv"), "--csv", help="Where the table goes as CSV."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows --csv already has (an earlier run of this "
                                "table on this GPU type, cut short) and measure only the rest."),
):
    """Time every row-wise kernel (fused and unfused) under CUDA graphs against its unfused chain, Inductor and
    FlashInfer; print achieved GB/s as a fraction of the measured copy bandwidth, and how close each kernel came to
    the read/write limit of its bytes (read and copy rates measured in the same run). With --tp N, time the collective
    fusions against NCCL, torch's symmetric-memory all-reduce and FlashInfer's fused all-reduce (where installed),
    and say where each stops paying. Needs CUDA GPUs."""
    import torch

    if not torch.cuda.is_available():
        console.print("[red]bench-kernels needs a CUDA GPU (none is visible here)[/red]")
        raise typer.Exit(2)
    if dtype not in ("bfloat16", "float16"):
        console.print(f"[red]--dtype must be bfloat16 or float16, got {dtype!r}[/red]")
        raise typer.Exit(2)
    _writable(csv_path, "--csv", folder=False)
    if tp > 1:
        from fusiontune.harness import bench_collectives as bench
    else:
        from fusiontune.harness import bench_kernels as bench
    known = [case.name for case in bench.cases()]
    unknown = sorted(set(op) - set(known))
    if unknown:
        console.print(f"[red]--op {', '.join(unknown)}: no such op{' with --tp' if tp > 1 else ''}; choose from "
                      f"{', '.join(known)}[/red]")
        raise typer.Exit(2)
    if tp > 1:
        if torch.cuda.device_count() < tp:
            console.print(f"[red]--tp {tp} needs {tp} GPUs; this machine shows {torch.cuda.device_count()}[/red]")
            raise typer.Exit(2)
    from fusiontune.harness.bench_table import TableMismatch

    try:
        if tp > 1:
            bench.run(tp, tuple(hidden) or bench.DEFAULT_HIDDEN, tuple(tokens) or bench.DEFAULT_TOKENS,
                      list(op) or None, csv_path, resume=resume)
        else:
            bench.run(tuple(hidden) or bench.DEFAULT_HIDDEN, tuple(tokens) or bench.DEFAULT_TOKENS,
                      getattr(torch, dtype), list(op) or None, csv_path, progress=console.print, resume=resume)
    except TableMismatch as exc:
        console.print(f"[red]--resume: {exc}[/red]")
        raise typer.Exit(2)
    console.print(f"table: {csv_path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'fusiontune tune'."),
    out: Path = typer.Option(Path("thresholds"), "--out", help="Root of the thresholds tree."),
    force: bool = typer.Option(False, "--force", metavar="", help="Export even a pick that does not beat all fusions "
                               "off beyond the noise floor."),
    vllm_version: str = VLLM_VERSION_OPTION,
):
    """Write the tuned PassConfig as thresholds/<device>/tp<N>-hidden<H>-<quant>.json, with its evidence and the
    same config as vLLM's --compilation-config JSON and -O/-cc.pass_config flags. A pick that does not beat all
    fusions off beyond the noise floor is refused unless --force."""
    from fusiontune.harness.export import ExportError, export_tuned
    from fusiontune.passes.vllm_versions import NEWEST

    _writable(out, "--out")
    try:
        path = export_tuned(run_dir, out, force=force, vllm_version=vllm_version or NEWEST)
    except ExportError as exc:
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(2)
    import json

    data = json.loads(path.read_text())
    console.print(f"wrote {path}")
    cannot = data["vllm"].get("cannot_run")
    if cannot:
        console.print(f"vLLM {data['vllm']['version']} cannot run the tuned pick (it turns on "
                      f"{', '.join(cannot['fusions'])}: {cannot['why']}); written instead: the best measured config it "
                      f"can run, {cannot['expected_speedup']:.3f}x against the pick's "
                      f"{cannot['tuned_expected_speedup']:.3f}x ({cannot['cost']})", markup=False)
    console.print(f"vLLM {data['vllm']['version']} flags: {data['vllm']['flags']}", markup=False)
    console.print(f"--compilation-config '{json.dumps(data['vllm']['compilation_config'])}'")


@app.command()
def thresholds(
    tp: int = TP_OPTION,
    hidden_size: int = HIDDEN_OPTION,
    quant: str = QUANT_OPTION,
    device: Optional[str] = typer.Option(None, "--device", help="Device name as torch reports it (default: this "
                                         "machine's GPU, or cpu)."),
    root: Path = typer.Option(Path("thresholds"), "--root", help="Root of the thresholds tree."),
    vllm_version: str = VLLM_VERSION_OPTION,
):
    """Find the tuned thresholds for a device, TP size and quant scheme (nearest hidden size), and print the vLLM
    flags they give."""
    from fusiontune.harness.export import ExportError, find_thresholds, flags_for
    from fusiontune.passes.vllm_versions import NEWEST

    _check_quant(quant)
    if device is None:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        path, data, note = find_thresholds(device, tp, hidden_size, quant, root)
        flags = flags_for(data, path, vllm_version or NEWEST)
    except ExportError as exc:
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(2)
    console.print(note)
    console.print(f"expected speedup {data['evidence']['expected_speedup']:.3f}x (noise floor "
                  f"{(data['evidence']['noise_floor'] or 0):.2%}), from run {data['evidence']['run']}")
    console.print(f"vLLM {vllm_version or NEWEST}: {flags}", markup=False)



@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="The earlier run folder (the reference)."),
    run_b: Path = typer.Argument(..., help="The later run folder."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the whole comparison as CSV."),
    fail: bool = typer.Option(True, "--fail/--no-fail", metavar="", help="Exit 1 when a config's speedup fell "
                              "outside both runs' intervals, a config broke, or a fusion stopped firing (for CI)."),
):
    """Configs measured in both runs, judged on their speedups (each run over its own all-off, so another machine
    of the same kind compares): which got slower or faster beyond both intervals, which broke or were fixed, which
    fusions stopped firing. How far all-off itself moved is printed apart."""
    from fusiontune.harness.compare import agreement, compare, regressions

    for run in (run_a, run_b):
        if not (run / "rows.jsonl").exists() and not (run / "results.parquet").exists():
            console.print(f"[red]{run} is not a run folder (no rows.jsonl or results.parquet)[/red]")
            raise typer.Exit(2)
    try:
        result = compare(run_a, run_b)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2)
    if result.empty:
        console.print("[yellow]no config, TP size and num_tokens was measured in both runs[/yellow]")
        raise typer.Exit(2)
    table = Table(title=f"{run_b} against {run_a}: speedups, each over its own all-off")
    for column in ("config", "TP", "num_tokens", "A speedup", "B speedup", "latency change", "verdict"):
        table.add_column(column, overflow="fold")  # a narrow terminal folds a config's flags, never cuts them

    def speed(value, low, high):
        return "-" if value != value else f"{value:.3f}x\n[{low:.3f}-{high:.3f}]"

    shown = result[~result["verdict"].isin(["within noise", "baseline", "no speedup"])]
    for row in shown.itertuples():
        colour = "red" if row.verdict.startswith(("slower", "broke", "stopped")) else "green"
        change = f"{row.change:+.2%}" if row.change == row.change else "-"
        table.add_row(row.label, str(row.tp), str(row.num_tokens), speed(row.speedup_a, row.ci_low_a, row.ci_high_a),
                      speed(row.speedup_b, row.ci_low_b, row.ci_high_b), change,
                      f"[{colour}]{row.verdict}[/{colour}]")
    if len(shown):
        console.print(table)
    else:
        console.print("no config moved beyond noise, broke, or stopped firing")
    moved = result[(result["verdict"] == "baseline") & result["change"].notna()]
    if len(moved):
        console.print(f"all-off latency moved by {moved['change'].min():+.2%} to {moved['change'].max():+.2%} "
                      "between the runs (the machine, not a fusion: speedups are judged each against its own "
                      "all-off)")
    console.print(f"{len(result)} rows in both runs: " + ", ".join(
        f"{count} {verdict}" for verdict, count in result["verdict"].value_counts().items()))
    unsettled = result[result["verdict"].isin(["within noise", "slower", "faster"])
                       & ((result["verdict_a"] == "not settled") | (result["verdict_b"] == "not settled"))]
    if len(unsettled):
        console.print(f"{len(unsettled)} of the judged rows are not settled in one run or both: their intervals are "
                      "honest but wider than measure.settle, so they are compared and not claimed")
    agreed = agreement(result)
    if agreed.rows:
        console.print(f"{agreed.joint} of {agreed.rows} speedups agree within their joint 95% uncertainty "
                      f"({agreed.joint / agreed.rows:.0%}; honest intervals: about 95%); {agreed.inside} lie inside "
                      f"the other run's interval, both ways ({agreed.inside / agreed.rows:.0%}; about 83% for "
                      "honest intervals of equal width)")
    if csv_path:
        result.to_csv(csv_path, index=False)
    if fail and len(regressions(result)):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
