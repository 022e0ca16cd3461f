"""Runs a sweep plan on Ray: one actor per TP rank, one placement group per TP group.

Local by default: an embedded Ray bound to 127.0.0.1, dashboard off, usage stats off. With an address ("auto",
"ray://host:10001") it joins an existing cluster, where fusiontune must be installed on every node.
TP > 1 forms a gloo group on CPU and an NCCL group on GPUs. Every config's rows are written as soon as its ranks
return; a config whose ranks raise, or whose actors die, is recorded ``failed`` and the sweep goes on (a dead
group is replaced).
"""

from __future__ import annotations

import os
import time
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
    """The actors of one TP group, placed together (STRICT_PACK: one node) and joined in a process group."""

    def __init__(self, tp: int, use_gpu: bool):
        self.tp = tp
        resources = ray.cluster_resources()
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
        ray.get(self.pg.ready(), timeout=300)
        cpus = int(resources.get("CPU", 1))
        threads = max(1, cpus // tp) if not use_gpu else None
        actor_cls = ray.remote(TPWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, tp, threads, "cuda" if use_gpu else "cpu")
            for rank in range(tp)
        ]
        init_method = ray.get(self.actors[0].rendezvous_address.remote())
        self.devices = ray.get([a.init_process_group.remote(init_method) for a in self.actors], timeout=600)

    def run(self, job: Job, timeout_s: float | None) -> list[list[RankResult]]:
        return ray.get([a.run.remote(job) for a in self.actors], timeout=timeout_s)

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
        row = base_row(plan, config.tp, config.config_id, config.label, config.is_baseline,
                       first.resolved or config.resolved)
        times = combine_ranks([r.times_ms for r in ranks]) if ranks and all(r.times_ms for r in ranks) else []
        errors = [r.error for r in ranks if r.error] or ([error] if error else [])
        max_err = max((r.max_abs_err for r in ranks), default=float("nan"))
        status = "ok"
        if errors and not times:
            status = "failed"
        elif max_err > first.tolerance:
            status = "incorrect"
        row.update(summarize(times))
        row.update({
            "num_tokens": num_tokens,
            "repeats": len(times),
            "max_abs_err": max_err,
            "tolerance": first.tolerance,
            "compile_s": max((r.compile_s for r in ranks), default=0.0),
            "status": status,
            "error": "\n".join(errors)[:4000],
            "device": device,
            "compile_range": first.compile_range,
            "active_passes": ",".join(first.active),
            "timing": first.timing,
        })
        row.update({f"matches_{spec.flag}": first.matches.get(spec.flag, 0) for spec in PASSES})
        rows.append(row)
    return rows


def base_row(plan: Plan, tp: int, config_id: str, label: str, is_baseline: bool,
             resolved: dict[str, Any]) -> dict[str, Any]:
    model = plan.model.to_dict()
    return {
        "sweep": plan.spec.name,
        "config_id": config_id,
        "label": label,
        "is_baseline": is_baseline,
        "tp": tp,
        "optimization_level": plan.spec.optimization_level,
        **{f"model_{k}": v for k, v in model.items()},
        **resolved,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def skipped_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for item in plan.skipped:
        for num_tokens in plan.spec.num_tokens:
            row = base_row(plan, item.tp, "", item.label, False, item.pass_config)
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


def run_plan(plan: Plan, folder: RunFolder, address: str | None = None,
             config_timeout_s: float | None = 3600,
             on_config: Callable[[PlannedConfig, list[dict]], None] | None = None) -> None:
    """Run every planned config, TP size by TP size, baseline first; rows go to ``folder`` as they come."""
    folder.append(skipped_rows(plan))
    if not plan.configs:
        return
    init_ray(address or plan.spec.cluster.address, plan.spec.cluster.dashboard, min_cpus=max(plan.spec.tp))
    measure = plan.spec.measure
    devices_seen: dict[int, list[str]] = {}
    resources = ray.cluster_resources()
    folder.update_manifest(cluster_resources={k: resources[k] for k in ("CPU", "GPU") if k in resources})
    for tp in sorted({c.tp for c in plan.configs}):
        group = None
        use_gpu, unrunnable = device_for(tp, plan.spec.cluster.device)
        for config in sorted(plan.configs_for(tp), key=lambda c: not c.is_baseline):
            if unrunnable:
                rows = [{**row, "status": "skipped", "error": unrunnable} for row in rows_for(plan, config, None)]
                folder.append(rows)
                if on_config:
                    on_config(config, rows)
                continue
            job = Job(config.config_id, config.pass_config, plan.spec.optimization_level, plan.model.to_dict(),
                      list(plan.spec.num_tokens), measure.warmup, measure.repeats, measure.seed, config.is_baseline)
            try:
                if group is None:
                    group = TPGroup(tp, use_gpu)
                    devices_seen[tp] = group.devices
                per_rank = group.run(job, config_timeout_s)
                rows = rows_for(plan, config, per_rank, device=group.devices[0])
            except Exception as exc:  # a dead actor, a timeout, a group that would not form
                rows = rows_for(plan, config, None, error=f"{type(exc).__name__}: {exc}"[:2000])
                if group is not None:
                    group.shutdown()
                group = None
            folder.append(rows)
            if on_config:
                on_config(config, rows)
        if group is not None:
            group.shutdown()
        folder.update_manifest(devices={str(k): v for k, v in devices_seen.items()})
