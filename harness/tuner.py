"""``fusiontune tune``: an Optuna study over fusion enables and thresholds, its trials run on TP groups through Ray.

The all-off baseline runs first; every trial's objective is its expected latency under the workload relative to
it (``tune.expected_ratio``). A trial first measures the size that weighs most in the objective: there it reports
its ratio, and the median pruner stops it when it is worse than the median of earlier trials at that size. Only
trials that survive measure the other sizes. Those compile from Inductor's cache, so the second stage costs little
more than its timing.

- **Each effective config is measured once.** Trials whose parameters resolve to a config already measured (a
  threshold of a fusion that is off changes nothing) take its value without running. The study records how many
  configs were actually measured ("evaluations"), which is the cost to compare with a grid.
- **The study lives in Optuna storage.** That is SQLite in the run folder by default, or any database URL. A second
  run of the same file resumes it, and several drivers can share it.
- **Fixed seed.** The TPE sampler's seed makes the order of suggestions reproducible; with more than one TP group,
  which trial finishes first also depends on timing.
- **A final check in one run.** The ``study.confirm`` best configs (3 by default) are measured again at the end,
  beside this run's baseline, and the best is picked among those numbers: a resumed study mixes runs, and two
  runs (two machines, two days) disagree by more than one run's noise floor. The per-range plan reads this run's
  rows only.
- **A start from all-on.** The first trial runs every searched fusion on (thresholds at their defaults), as the
  reference page expects them to pay; ``study.start_all_on: false`` leaves the start to the sampler.
- **Grid mode.** ``--grid`` evaluates every combination instead, as the reference the tuner is judged against.
- **Rows.** Every measured trial writes its rows to the run folder like a sweep config, so ``fusiontune report``
  reads a tune folder too. The baseline is measured again at the end for the noise floor.
- **Per-range enables.** The summary also holds the per-size plan (``per_range.range_plan``): the fastest measured
  config at each size where it beats the best one beyond noise, and the PassConfig thresholds that run it, or
  why vLLM cannot.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from fusiontune.passes.fusions import FUSION_FLAGS, PASSES, PASSES_BY_FLAG, THRESHOLDS
from fusiontune.passes.platform import Platform

from .groups import GroupPool, groups_to_use
from .jobs import Job
from .launcher import Recorder, check_same_machine, device_for, init_ray, job_for
from .per_range import for_tune_run
from .results import RunFolder
from .sweep import (Plan, PlannedConfig, Skipped, SweepError, _show, built_model, expand, plan_config,
                    target_platform)
from .tune_spec import TuneSpec, expected_ratio, first_size, trial_fields, workload_weights
from .worker import TPWorker


@dataclass
class _Stage:
    trial: optuna.trial.Trial
    config: PlannedConfig
    stage: int  # 1: the first size; 2: the rest
    first_ms: dict[int, float]


def _searched(params: dict[str, Any]) -> str:
    """A trial's searched values, as config labels show them."""
    return " ".join(f"{k}={_show(v)}" for k, v in params.items())


def parameters(spec: TuneSpec) -> list[tuple[str, list[Any]]]:
    """The searched parameters in the order a trial draws them: fusions in pass order (a pass before those that
    require it), then thresholds."""
    fusions = sorted(spec.search.fusions, key=FUSION_FLAGS.index)
    return [(flag, [False, True]) for flag in fusions] + [(n, list(c)) for n, c in spec.search.thresholds.items()]


def _matters(name: str, known: dict[str, Any], spec: TuneSpec) -> bool:
    """Whether parameter ``name`` changes the config, given the values ``known`` so far: a fusion whose required
    pass is off cannot run (PassConfig refuses it), and a threshold of fusions that are all off means nothing. A
    flag neither known nor fixed is the level's to decide, so it may be on."""
    def may_be_on(flag: str) -> bool:
        value = known.get(flag, spec.pass_config.get(flag))
        return value is None or bool(value)

    if name in THRESHOLDS:
        return any(may_be_on(p.flag) for p in PASSES if any(t.name == name for t in p.thresholds))
    return all(may_be_on(flag) for flag in PASSES_BY_FLAG[name].requires)


def _points(spec: TuneSpec, choose: Callable[[str, list[Any]], list[Any]]) -> list[dict[str, Any]]:
    """The points ``choose`` picks (one value or all of each parameter's choices), drawing a parameter only where
    it matters; a fusion not drawn is off, and so known to the parameters after it."""
    walks: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})]  # (point, known)
    for name, choices in parameters(spec):
        grown = []
        for point, known in walks:
            if _matters(name, known, spec):
                grown += [({**point, name: value}, {**known, name: value}) for value in choose(name, choices)]
            else:
                grown.append((point, {**known, name: False} if name in FUSION_FLAGS else known))
        walks = grown
    return [point for point, _ in walks]


def suggest(trial: optuna.trial.Trial, spec: TuneSpec) -> dict[str, Any]:
    """A trial's point, drawn parameter by parameter; one that cannot matter is not drawn. So no trial is spent
    on a config PassConfig refuses (AsyncTP without sequence parallelism), nor on a threshold of a fusion that is
    off, and the sampler learns over the configs that exist."""
    return _points(spec, lambda name, choices: [trial.suggest_categorical(name, choices)])[0]


def grid_points(spec: TuneSpec) -> list[dict[str, Any]]:
    """Every point ``suggest`` can draw: the grid, without the combinations that cannot run or mean the same."""
    return _points(spec, lambda name, choices: choices)


def grid_size(spec: TuneSpec) -> int:
    return len(grid_points(spec))


class Tuner:
    def __init__(self, spec: TuneSpec, folder: RunFolder, grid: bool = False, trials: int | None = None,
                 address: str | None = None, timeout_s: float | None = 3600, base_dir: Path = Path("."),
                 on_trial: Callable[[dict[str, Any]], None] | None = None, worker_cls: type = TPWorker,
                 platform: Platform | None = None, weights: dict[int, float] | None = None):
        self.spec, self.folder, self.grid, self.on_trial, self.worker_cls = spec, folder, grid, on_trial, worker_cls
        self.address, self.timeout_s = address, timeout_s
        self.weights = weights or workload_weights(spec, base_dir)  # ``check``'s, or read here
        self.trials = grid_size(spec) if grid else (trials or spec.study.trials)
        # the baseline and its repeat (and the fixed config), on the workers' platform (default: this machine)
        self.plan: Plan = expand(spec.as_sweep(), platform)
        if not any(c.is_baseline for c in self.plan.configs):
            reasons = "; ".join(sorted({s.reason for s in self.plan.skipped})) or "nothing to run"
            raise SweepError(f"TP={spec.tp}: {reasons}")
        self.recorder = Recorder(self.plan, folder)
        # what every trial's PassConfig resolves on
        self.platform = target_platform(self.plan.model, spec.tp, self.plan.platform)
        self.measured: dict[str, dict[str, Any]] = {}  # effective config -> {"value", "trial", "config_id"}
        self.baseline_ms: dict[int, float] = {}
        self.pruned: set[str] = set()  # effective configs a trial was pruned at
        self.started: set[str] = set()  # effective configs this run began to measure
        self.baseline_effective = ""
        self.confirmed: list[dict[str, Any]] = []

    def study(self) -> optuna.Study:
        spec = self.spec.study
        storage = spec.storage or f"sqlite:///{(self.folder.path / 'study.db').resolve()}"
        name = (spec.study_name or self.spec.name) + ("-grid" if self.grid else "")
        # The grid is enqueued point by point (Optuna's GridSampler stops the study from inside, which only an
        # optimize() loop allows, not ask-and-tell).
        with warnings.catch_warnings():  # multivariate and group are "experimental" in Optuna's words
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = (optuna.samplers.RandomSampler(seed=spec.seed) if self.grid else
                       optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials,
                                                  multivariate=True, group=True))  # group: ``suggest`` is conditional
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
                  if spec.prune and not self.grid else optuna.pruners.NopPruner())
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        if self.grid and not study.trials:
            for point in grid_points(self.spec):
                study.enqueue_trial(point)
        elif not self.grid and self.spec.study.start_all_on:
            start = self.all_on()
            if not any(start in (t.params, t.system_attrs.get("fixed_params")) for t in study.trials):
                study.enqueue_trial(start)
        return study

    def all_on(self) -> dict[str, Any]:
        """Every searched fusion on, each threshold at its PassConfig default where that is a choice (else the
        middle choice): the reference page's expectation, tried first so the study starts from it."""
        def start(name: str, choices: list[Any]) -> list[Any]:
            default = THRESHOLDS[name].default(self.platform)[0] if name in THRESHOLDS else True
            return [default if default in choices else choices[len(choices) // 2]]

        return _points(self.spec, start)[0]

    def run(self) -> dict[str, Any]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study()
        for trial in study.get_trials(states=(TrialState.COMPLETE,)):  # a resumed study: what it already measured
            if "effective" in trial.user_attrs and trial.user_attrs.get("measured"):
                self.measured[trial.user_attrs["effective"]] = {"value": trial.value, "trial": trial.number,
                                                                "config_id": trial.user_attrs.get("config_id")}
        for trial in study.get_trials(states=(TrialState.PRUNED,)):
            if "effective" in trial.user_attrs:
                self.pruned.add(trial.user_attrs["effective"])
        baseline = next(c for c in self.plan.configs if c.is_baseline)
        again = next((c for c in self.plan.configs if c.baseline_repeat), None)
        init_ray(self.address or self.spec.cluster.address, self.spec.cluster.dashboard, min_cpus=self.spec.tp)
        use_gpu, unrunnable = device_for(self.spec.tp, self.spec.cluster.device)
        if unrunnable:
            raise SweepError(unrunnable)
        done = len([t for t in study.trials if t.state.is_finished()])
        to_run = max(0, self.trials - done)
        pool = GroupPool(self.spec.tp, use_gpu, groups_to_use(self.spec.tp, use_gpu, self.spec.cluster.groups,
                                                              max(1, to_run)), self.timeout_s, self.worker_cls)
        try:
            outcome = pool.run_first(job_for(self.plan, baseline), baseline)
            check_same_machine(self.folder, self.spec.tp, pool.devices)  # a resumed study measured elsewhere
            rows = self.recorder.record(outcome)
            self.baseline_ms = {r["num_tokens"]: r["latency_ms"] for r in rows if r["status"] == "ok"}
            if set(self.baseline_ms) != set(self.spec.num_tokens):
                raise SweepError("the all-off baseline failed at some num_tokens; see its log in "
                                 f"{self.folder.path / 'logs'}")
            # A trial that resolves to all-off is the baseline: its ratio is 1 by definition.
            self.measured.setdefault(baseline.effective, {"value": 1.0, "trial": "baseline",
                                                          "config_id": baseline.config_id})
            self.baseline_effective = baseline.effective
            study.set_user_attr("baseline_ms", {str(k): v for k, v in self.baseline_ms.items()})
            study.set_user_attr("weights", {str(k): v for k, v in self.weights.items()})
            self._trials(study, pool, to_run)
            self.confirmed = self._confirm(study, pool)
            if again is not None:
                pool.submit(job_for(self.plan, again), again)
                self.recorder.record(pool.next_done())
        finally:
            pool.shutdown()
        return self.summary(study)

    def summarize(self) -> dict[str, Any]:
        """``tune.json`` from the study as it stands, measuring nothing: for a tune stopped before its end, which
        writes it last. The best is the study's lowest value, marked unconfirmed (no final check ran)."""
        study = self.study()
        self.baseline_ms = {int(n): ms for n, ms in study.user_attrs.get("baseline_ms", {}).items()}
        if not self.baseline_ms:
            raise SweepError(f"{self.folder.path}: the study has no measured baseline yet, so nothing to summarise")
        return self.summary(study)

    def _trials(self, study: optuna.Study, pool: GroupPool, to_run: int) -> None:
        first = first_size(self.weights, self.baseline_ms)
        rest = [n for n in self.spec.num_tokens if n != first and self.weights.get(n, 0) > 0]
        asked = 0
        budget = self.spec.study.max_evaluations

        def ask():
            nonlocal asked
            if asked >= to_run or self._spent(budget):
                return None
            asked += 1
            return self._ask(study, first)

        def tell(outcome):
            stage: _Stage = outcome.tag
            rows = self.recorder.record(outcome, stage.config)
            ms = {r["num_tokens"]: r["latency_ms"] for r in rows if r["status"] == "ok"}
            bad = [r for r in rows if r["status"] != "ok"]
            if bad:
                self._tell(study, stage.trial, stage.config, None, f"{bad[0]['status']}: {bad[0]['error'][:300]}")
            elif stage.stage == 1:
                stage.trial.report(ms[first] / self.baseline_ms[first], 0)
                if rest and stage.trial.should_prune():
                    self._tell(study, stage.trial, stage.config, None, "pruned", state=TrialState.PRUNED)
                elif rest:  # the other sizes, next
                    return [(job_for(self.plan, stage.config, rest), _Stage(stage.trial, stage.config, 2, ms))]
                else:
                    self._tell(study, stage.trial, stage.config, expected_ratio(ms, self.baseline_ms, self.weights))
            else:
                value = expected_ratio({**stage.first_ms, **ms}, self.baseline_ms, self.weights)
                self._tell(study, stage.trial, stage.config, value)
            return []

        pool.drive(ask, tell)

    def _ask(self, study: optuna.Study, first: int) -> list[tuple[Job, _Stage]]:
        """One trial: the job of its first size, or none (it could not run, or took an earlier measurement)."""
        trial = study.ask()
        fields = trial_fields(self.spec, suggest(trial, self.spec))
        planned = plan_config(fields, f"trial {trial.number}: {_searched(trial.params)}", self.spec.tp, self.plan.model,
                              self.spec.optimization_level, self.platform, collectives=self.spec.collectives)
        if isinstance(planned, (Skipped, str)):  # cannot run, or a no-op: tell Optuna and move on
            why = planned.reason if isinstance(planned, Skipped) else planned
            self._tell(study, trial, None, None, why, state=TrialState.FAIL)
            return []
        seen = self.measured.get(planned.effective)
        if seen is not None:
            trial.set_user_attr("same_as_trial", seen["trial"])
            self._tell(study, trial, planned, seen["value"], measured=False, measured_as=seen["config_id"])
            return []
        if planned.effective in self.pruned:
            self._tell(study, trial, planned, None, "pruned before", state=TrialState.PRUNED, measured=False)
            return []
        self.started.add(planned.effective)
        return [(job_for(self.plan, planned, [first]), _Stage(trial, planned, 1, {}))]

    def _confirm(self, study: optuna.Study, pool: GroupPool) -> list[dict[str, Any]]:
        """Measure the ``study.confirm`` best distinct configs again at every weighted size, in this run, beside
        this run's baseline. A study's values come from several runs when it resumed, and runs on different
        machines (or days) disagree by more than one run's noise: the pick is made among numbers of one run."""
        if self.grid or self.spec.study.confirm < 1:
            return []
        picked: dict[str, optuna.trial.FrozenTrial] = {}
        for trial in sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value):
            effective = trial.user_attrs.get("effective")
            if effective and effective != self.baseline_effective and effective not in picked:
                picked[effective] = trial
            if len(picked) == self.spec.study.confirm:
                break
        sizes = [n for n in self.spec.num_tokens if self.weights.get(n, 0) > 0]
        queue = []
        for trial in picked.values():
            planned = plan_config(trial_fields(self.spec, trial.params),
                                  f"trial {trial.number}, measured again: {_searched(trial.params)}", self.spec.tp,
                                  self.plan.model, self.spec.optimization_level, self.platform,
                                  collectives=self.spec.collectives)
            queue.append((trial, replace(planned, config_id=f"{planned.config_id}-confirm")))
        confirmed = []

        def ask():
            return [(job_for(self.plan, queue[0][1], sizes), queue.pop(0))] if queue else None

        def tell(outcome):
            trial, config = outcome.tag
            rows = self.recorder.record(outcome, config)
            ms = {r["num_tokens"]: r["latency_ms"] for r in rows if r["status"] == "ok"}
            confirmed.append({"trial": trial.number, "config_id": config.config_id, "params": trial.params,
                              "study_value": trial.value,
                              "expected_ratio": expected_ratio(ms, self.baseline_ms, self.weights)})
            return []

        pool.drive(ask, tell)
        return sorted(confirmed, key=lambda c: c["expected_ratio"])

    def _spent(self, budget: int | None) -> bool:
        """Whether ``budget`` configs have been measured (or are being measured), this run and earlier ones."""
        return budget is not None and len(self.started | set(self.measured) - {self.baseline_effective}) >= budget

    def _tell(self, study: optuna.Study, trial, config: PlannedConfig | None, value: float | None, note: str = "",
              state: TrialState | None = None, measured: bool = True, measured_as: str | None = None) -> None:
        """Finish ``trial``; ``measured_as``: the config whose rows hold its measurement (another trial's, or the
        baseline's, when it took their value)."""
        if config is not None:
            trial.set_user_attr("effective", config.effective)
            trial.set_user_attr("config_id", measured_as or config.config_id)
            trial.set_user_attr("measured", measured)
        if note:
            trial.set_user_attr("note", note)
        if state is None and (value is None or not math.isfinite(value)):
            state = TrialState.FAIL
        if state is None:
            study.tell(trial, value)
            if measured and config is not None:
                self.measured[config.effective] = {"value": value, "trial": trial.number,
                                                   "config_id": config.config_id}
        else:
            study.tell(trial, state=state)
            if state == TrialState.PRUNED and config is not None:
                self.pruned.add(config.effective)
        if self.on_trial:
            self.on_trial({"trial": trial.number, "value": value, "state": (state or TrialState.COMPLETE).name,
                           "params": trial.params, "note": note, "measured": measured})

    def summary(self, study: optuna.Study) -> dict[str, Any]:
        trials = study.get_trials()
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = min(complete, key=lambda t: t.value) if complete else None
        summary = {
            "study": study.study_name,
            "mode": "grid" if self.grid else "tpe",
            "trials": len(trials),
            "evaluations": len({t.user_attrs["effective"] for t in trials if t.user_attrs.get("measured")
                                and "effective" in t.user_attrs}),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "grid_size": grid_size(self.spec),
            "weights": {str(k): v for k, v in self.weights.items()},
            "baseline_ms": {str(k): v for k, v in self.baseline_ms.items()},
            "best": None if best is None else {"trial": best.number, "expected_ratio": best.value,
                                               "expected_speedup": 1 / best.value, "params": best.params,
                                               "pass_config": trial_fields(self.spec, best.params),
                                               "config_id": best.user_attrs.get("config_id")},
        }
        confirmed = [c for c in self.confirmed if math.isfinite(c["expected_ratio"])]
        summary["unconfirmed"] = bool(best) and not confirmed and not self.grid and self.spec.study.confirm > 0
        if confirmed:  # the pick among one run's numbers (``_confirm``)
            top = confirmed[0]
            summary["confirmed"] = self.confirmed
            summary["best"] = {"trial": top["trial"], "expected_ratio": top["expected_ratio"],
                               "expected_speedup": 1 / top["expected_ratio"], "study_value": top["study_value"],
                               "params": top["params"], "pass_config": trial_fields(self.spec, top["params"]),
                               "config_id": top["config_id"]}
        summary["noise_floor"] = self.noise_floor()
        summary["per_range"] = for_tune_run(self.folder.table(), summary)
        (self.folder.path / "tune.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def noise_floor(self) -> float | None:
        """The objective's noise floor: each size's floor (the report's) weighted as the objective weighs it."""
        from .analysis import noise_floor

        floors = noise_floor(self.folder.table()).set_index("num_tokens")["noise_floor"]
        used = [n for n, w in self.weights.items() if w > 0 and n in floors and n in self.baseline_ms]
        if not used or floors[used].isna().any():
            return None
        weight = {n: self.weights[n] * self.baseline_ms[n] for n in used}
        return float(sum(weight[n] * floors[n] for n in used) / sum(weight.values()))


def check(spec: TuneSpec, base_dir: Path = Path(".")) -> dict[int, float]:
    """Raise SweepError for what a tune can be refused for on any machine, before a cluster is joined: a model,
    search or workload that does not hold. (What runs where is the workers' platform's to say: ``Tuner``.) Returns
    the workload's weights, read once, for the ``Tuner``."""
    built_model(spec.as_sweep())
    return workload_weights(spec, base_dir)
