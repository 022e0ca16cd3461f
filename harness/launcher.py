"""Runs a sweep plan on Ray: one actor per TP rank, one placement group per TP group, several groups at once.

Local by default: an embedded Ray bound to 127.0.0.1, dashboard off, usage stats off. With an address ("auto",
"ray://host:10001") it joins an existing cluster, where fusiontune must be installed on every node. TP > 1 forms a
gloo group on CPU and an NCCL group on GPUs.

Scheduling, per TP size: the all-off baseline runs first, on one group; its outputs (the reference every other
config is checked against) then seed as many more groups as the cluster holds (``cluster.groups``), and the
configs go to whichever group is free, the baseline's repeat last. Every config's rows are written the moment its
ranks return. A config that raises, hangs past the per-config timeout, or kills an actor is recorded ``failed``
with its error; its group is torn down, a fresh one (seeded with the baseline outputs) takes its place, and the
sweep goes on.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fusiontune.passes.fusions import PASSES

from .results import RunFolder
from .sweep import Plan, PlannedConfig
from .timing import combine_ranks, summarize
from .worker import Job, RankResult, TPWorker

# Never let NCCL, torch symmetric memory or NVSHMEM create NVLink multicast objects on shared hosts.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
POLL_S = 0.5


def init_ray(address: str | None, dashboard: bool = False, min_cpus: int = 1) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, runtime_env={"env_vars": SAFE_ENV}, log_to_driver=False)
        return
    ray.init(
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        include_dashboard=dashboard,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": SAFE_ENV},
        log_to_driver=False,
        configure_logging=False,
    )


class TPGroup:
    """The actors of one TP group, placed together (STRICT_PACK: one node) and joined in a process group.

    Construction only asks Ray for the placement and the actors; ``ready()`` waits for the process group, so
    several groups can form at once."""

    def __init__(self, tp: int, use_gpu: bool, threads: int | None, worker_cls: type = TPWorker):
        self.tp = tp
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
        actor_cls = ray.remote(worker_cls)
        self.actors = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, tp, threads, "cuda" if use_gpu else "cpu")
            for rank in range(tp)
        ]
        self.devices: list[str] = []

    def ready(self, timeout_s: float = 600) -> "TPGroup":
        ray.get(self.pg.ready(), timeout=timeout_s)
        init_method = ray.get(self.actors[0].rendezvous_address.remote(), timeout=timeout_s)
        self.devices = ray.get([a.init_process_group.remote(init_method) for a in self.actors], timeout=timeout_s)
        return self

    def submit(self, job: Job) -> list:
        return [a.run.remote(job) for a in self.actors]

    def load_baseline(self, job: Job, outputs_ref) -> None:
        ray.get([a.load_baseline.remote(job.model, job.seed, outputs_ref) for a in self.actors], timeout=600)

    def logs(self) -> str:
        try:
            return "".join(ray.get([a.job_log.remote() for a in self.actors], timeout=30))
        except Exception as exc:  # noqa: BLE001 - a dead actor has no log left to give
            return f"(the workers' logs could not be read: {type(exc).__name__})\n"

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass


def rows_for(plan: Plan, config: PlannedConfig, per_rank: list[list[RankResult]] | None,
             error: str = "", device: str = "") -> list[dict[str, Any]]:
    """Merge the ranks' results for one config into one row per num_tokens."""
    rows = []
    for i, num_tokens in enumerate(plan.spec.num_tokens):
        ranks = [results[i] for results in per_rank] if per_rank else []
        first = ranks[0] if ranks else RankResult(num_tokens, error=error or "no result")
        row = base_row(plan, config, first.resolved or config.resolved)
        times = combine_ranks([r.times_ms for r in ranks]) if ranks and all(r.times_ms for r in ranks) else []
        errors = [r.error for r in ranks if r.error] or ([error] if error else [])
        max_err = max((r.max_abs_err for r in ranks), default=float("nan"))
        status = "ok"
        if errors and not times:
            status = "failed"
        elif max_err > first.tolerance:
            status = "incorrect"
        row.update(summarize(times, plan.spec.measure.settle))
        row.update({
            "num_tokens": num_tokens,
            "max_abs_err": max_err,
            "tolerance": first.tolerance,
            "compile_s": max((r.compile_s for r in ranks), default=0.0),
            "status": status,
            "error": "\n".join(errors)[:4000],
            "device": device,
            "compile_range": first.compile_range,
            "active_passes": ",".join(first.active),
            "timing": first.timing,
            **{column: (min if "clock" in column else max)(r.gpu.get(column, float("nan")) for r in ranks)
               for column in first.gpu},  # the slowest clock, the hottest and hungriest GPU of the group
        })
        row.update({f"matches_{spec.flag}": first.matches.get(spec.flag, 0) for spec in PASSES})
        rows.append(row)
    return rows


def base_row(plan: Plan, config: PlannedConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    model = plan.model.to_dict()
    return {
        "sweep": plan.spec.name,
        "config_id": config.config_id,
        "label": config.label,
        "is_baseline": config.is_baseline,
        "baseline_repeat": config.baseline_repeat,
        "tp": config.tp,
        "optimization_level": plan.spec.optimization_level,
        **{f"model_{k}": v for k, v in model.items()},
        **resolved,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def kernel_rows(config: PlannedConfig, per_rank: list[list[RankResult]]) -> list[dict[str, Any]]:
    stamp = time.time()
    return [{"config_id": config.config_id, "label": config.label, "tp": config.tp, "num_tokens": result.num_tokens,
             "rank": rank, "measured_at": stamp, **kernel}
            for rank, results in enumerate(per_rank) for result in results for kernel in result.kernels]


def skipped_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for item in plan.skipped:
        for num_tokens in plan.spec.num_tokens:
            config = PlannedConfig("", item.label, item.tp, item.pass_config, {})
            row = base_row(plan, config, item.pass_config)
            row.update({"num_tokens": num_tokens, "status": "skipped", "error": item.reason,
                        **{f"matches_{spec.flag}": 0 for spec in PASSES}})
            rows.append(row)
    return rows


def device_for(tp: int, wanted: str) -> tuple[bool, str]:
    """(use GPUs?, why not runnable) for a TP group: never fall back to CPU for want of GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if wanted == "cpu" or (wanted == "auto" and gpus == 0):
        return False, ""
    if gpus < tp:
        return True, f"TP={tp} needs {tp} GPUs; the Ray cluster has {gpus} (use cluster.device: cpu to run on CPUs)"
    return True, ""


def group_capacity(tp: int, use_gpu: bool, nodes: list[dict] | None = None) -> int:
    """How many TP groups of ``tp`` ranks fit at once, each on one node (STRICT_PACK)."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive", True)]
    key = "GPU" if use_gpu else "CPU"
    return sum(int(n.get("Resources", {}).get(key, 0)) // tp for n in nodes)


def groups_to_use(tp: int, use_gpu: bool, wanted: str | int, configs: int) -> int:
    capacity = max(1, group_capacity(tp, use_gpu))
    limit = capacity if wanted == "auto" and use_gpu else (1 if wanted == "auto" else min(int(wanted), capacity))
    return max(1, min(limit, configs))


def job_for(plan: Plan, config: PlannedConfig) -> Job:
    measure = plan.spec.measure
    return Job(config.config_id, config.pass_config, plan.spec.optimization_level, plan.model.to_dict(),
               list(plan.spec.num_tokens), measure.warmup, measure.repeats, measure.seed,
               is_baseline=config.is_baseline, max_repeats=measure.max_repeats, settle=measure.settle,
               profile=measure.profile and not config.reference_only, reference_only=config.reference_only,
               compile_cache=measure.compile_cache)


@dataclass
class _InFlight:
    group: TPGroup
    config: PlannedConfig
    refs: list
    started: float
    checked: set = field(default_factory=set)  # refs seen ready without an error


def _first_error(ready: list, checked: set) -> str:
    """The error of the first rank in ``ready`` that failed ('' if none did)."""
    for ref in ready:
        if ref in checked:
            continue
        try:
            ray.get(ref, timeout=0)
        except Exception as exc:  # noqa: BLE001 - an actor that died, a task that raised
            return f"{type(exc).__name__}: {exc}"[:2000]
        checked.add(ref)
    return ""


class _TPSizeRun:
    """Runs one TP size's configs over up to ``groups`` TP groups (see the module docstring)."""

    def __init__(self, plan: Plan, folder: RunFolder, tp: int, use_gpu: bool, groups: int,
                 timeout_s: float | None, on_config, worker_cls: type):
        self.plan, self.folder, self.tp, self.use_gpu = plan, folder, tp, use_gpu
        self.timeout_s, self.on_config, self.worker_cls = timeout_s, on_config, worker_cls
        self.groups_wanted = groups
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.threads = None if use_gpu else max(1, cpus // (tp * groups))
        self.baseline_ref = None  # the all-off outputs, in the object store, once the first config has run
        self.baseline_job: Job | None = None
        self.devices: set[str] = set()

    def new_group(self, started: TPGroup | None = None) -> TPGroup:
        """A group ready for configs (``started``: one whose actors were asked for earlier)."""
        group = (started or TPGroup(self.tp, self.use_gpu, self.threads, self.worker_cls)).ready()
        self.devices.update(group.devices)
        if self.baseline_ref is not None:
            group.load_baseline(self.baseline_job, self.baseline_ref)
        return group

    def run(self, configs: list[PlannedConfig]) -> None:
        queue = list(configs)
        idle: list[TPGroup] = []
        busy: list[_InFlight] = []
        first = queue.pop(0)  # the baseline (or a resumed run's reference-only baseline): alone, on one group
        try:
            group = self.new_group()
        except Exception as exc:  # noqa: BLE001 - no group at all: every config fails with the reason
            for config in [first, *queue]:
                self.finish(config, None, f"{type(exc).__name__}: the TP group would not form: {exc}", "")
            return
        self.baseline_job = job_for(self.plan, first)
        busy.append(_InFlight(group, first, group.submit(self.baseline_job), time.monotonic()))
        # The other groups' actors start (processes, imports) while the baseline runs.
        starting = [TPGroup(self.tp, self.use_gpu, self.threads, self.worker_cls)
                    for _ in range(min(self.groups_wanted, len(queue) + 1) - 1)]
        self.wait_all(busy, idle)
        if first.is_baseline or first.reference_only:
            if idle:  # the outputs live in the driver's object store, so a lost group does not take them along
                self.baseline_ref = ray.put(ray.get(idle[0].actors[0].baseline_outputs.remote(
                    self.baseline_job.model, self.baseline_job.seed), timeout=600))
        while queue or busy:
            while queue and (idle or len(busy) < self.groups_wanted):
                try:
                    group = idle.pop() if idle else self.new_group(starting.pop() if starting else None)
                except Exception as exc:  # noqa: BLE001
                    config = queue.pop(0)
                    self.finish(config, None, f"{type(exc).__name__}: the TP group would not form: {exc}", "")
                    continue
                config = queue.pop(0)
                busy.append(_InFlight(group, config, group.submit(job_for(self.plan, config)), time.monotonic()))
            if busy:  # (empty when every group left failed to form)
                self.wait_one(busy, idle)
        for group in idle + starting:
            group.shutdown()

    def wait_all(self, busy: list[_InFlight], idle: list[TPGroup]) -> None:
        while busy:
            self.wait_one(busy, idle)

    def wait_one(self, busy: list[_InFlight], idle: list[TPGroup]) -> None:
        """Block until some in-flight config ends (done, failed or timed out), record it, free its group."""
        while True:
            for item in list(busy):
                ready, _ = ray.wait(item.refs, num_returns=len(item.refs), timeout=0)
                timed_out = self.timeout_s is not None and time.monotonic() - item.started > self.timeout_s
                # A rank that died ends the config now: its peers may wait in a collective until the timeout.
                crashed = len(ready) < len(item.refs) and _first_error(ready, item.checked)
                if len(ready) < len(item.refs) and not timed_out and not crashed:
                    continue
                busy.remove(item)
                per_rank, error, log = None, "", ""
                if crashed:
                    error = crashed
                elif timed_out and len(ready) < len(item.refs):
                    error = f"timed out: the config ran past {self.timeout_s:.0f} s (--config-timeout)"
                else:
                    try:
                        per_rank = ray.get(item.refs)
                    except Exception as exc:  # noqa: BLE001 - a dead actor, a task that raised
                        error = f"{type(exc).__name__}: {exc}"[:2000]
                if per_rank is None:  # its actors may be dead or stuck in a collective: replace the group
                    log = "(no worker log: the group was torn down)\n"
                    item.group.shutdown()
                else:
                    log = item.group.logs()
                    idle.append(item.group)
                self.finish(item.config, per_rank, error, log, item.group.devices[0] if item.group.devices else "")
                return
            if busy:
                ray.wait([ref for item in busy for ref in item.refs], num_returns=1, timeout=POLL_S)

    def finish(self, config: PlannedConfig, per_rank, error: str, log: str, device: str = "") -> None:
        self.write_log(config, log, error)
        if config.reference_only:
            return  # its rows exist from the interrupted run
        rows = rows_for(self.plan, config, per_rank, error=error, device=device)
        if per_rank:
            self.folder.append_kernels(kernel_rows(config, per_rank))
            for result in per_rank[0]:
                if result.trace:
                    self.folder.write_trace(f"{config.config_id}-tp{config.tp}-n{result.num_tokens}", result.trace)
        self.folder.append(rows)
        if self.on_config:
            self.on_config(config, rows)

    def write_log(self, config: PlannedConfig, log: str, error: str) -> None:
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", config.label)[:80]
        text = f"# TP={config.tp} {config.label} ({config.config_id})\n{log}"
        if error:
            text += f"\nfailed: {error}\n"
        self.folder.write_log(f"tp{config.tp}-{name}-{config.config_id}", text)


def run_plan(plan: Plan, folder: RunFolder, address: str | None = None,
             config_timeout_s: float | None = 3600,
             on_config: Callable[[PlannedConfig, list[dict]], None] | None = None,
             worker_cls: type = TPWorker) -> None:
    """Run every planned config, TP size by TP size, baseline first; rows go to ``folder`` as they come."""
    folder.append(skipped_rows(plan))
    if not plan.configs:
        return
    init_ray(address or plan.spec.cluster.address, plan.spec.cluster.dashboard, min_cpus=max(plan.spec.tp))
    resources = ray.cluster_resources()
    folder.update_manifest(cluster_resources={k: resources[k] for k in ("CPU", "GPU") if k in resources})
    devices_seen: dict[str, list[str]] = {}
    groups_used: dict[str, int] = {}
    for tp in sorted({c.tp for c in plan.configs}):
        configs = sorted(plan.configs_for(tp), key=lambda c: (not (c.is_baseline or c.reference_only),
                                                               c.baseline_repeat))
        use_gpu, unrunnable = device_for(tp, plan.spec.cluster.device)
        if unrunnable:
            for config in configs:
                if config.reference_only:
                    continue
                rows = [{**row, "status": "skipped", "error": unrunnable} for row in rows_for(plan, config, None)]
                folder.append(rows)
                if on_config:
                    on_config(config, rows)
            continue
        groups = groups_to_use(tp, use_gpu, plan.spec.cluster.groups, len(configs))
        run = _TPSizeRun(plan, folder, tp, use_gpu, groups, config_timeout_s, on_config, worker_cls)
        run.run(configs)
        devices_seen[str(tp)] = sorted(run.devices)
        groups_used[str(tp)] = groups
        folder.update_manifest(devices=devices_seen, groups=groups_used)
