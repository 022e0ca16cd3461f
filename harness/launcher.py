"""Runs a sweep plan on Ray: one actor per TP rank, one placement group per TP group, several groups at once.

Local by default: an embedded Ray bound to 127.0.0.1, dashboard off, usage stats off. With an address ("auto",
"ray://host:10001") it joins an existing cluster, where fusiontune must be installed on every node. TP > 1 forms a
gloo group on CPU and an NCCL group on GPUs.

Scheduling, per TP size: a ``groups.GroupPool`` of as many TP groups as the cluster holds (``cluster.groups``)
runs the all-off baseline first, alone; then the configs go to whichever group is free, the baseline's repeat last.
Every config's rows are written the moment its ranks return; a paired batch's, size by size as it streams them. A
config that raises, hangs past the per-config timeout, or kills an actor is recorded ``failed`` with its error, and
the sweep goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
from typing import Any, Callable, NamedTuple

import ray

from fusiontune.kernels.symm_mem import MULTICAST_OFF
from fusiontune.passes.platform import Platform

from .groups import GroupPool, Outcome, groups_to_use
from .results import RESUMABLE_SKIP, RunFolder
from .jobs import Job
from .roles import Role
from .rows import kernel_rows, rows_for, skipped_rows
from .sweep import Plan, PlannedConfig, target_platform
from .worker import TPWorker

# Every GPU actor sees all GPUs of its node and selects the one Ray assigned it (worker.local_gpu_index): torch's
# symmetric memory (the fused all-reduce, AsyncTP) maps the peers' memory by device, which fails when every rank
# calls its GPU cuda:0. vLLM's Ray executor does the same.
WORKER_ENV = {**MULTICAST_OFF, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def answers(address: str, timeout_s: float = 5.0) -> None:
    """For a ``host:port`` address, a ConnectionError unless something listens there. Ray itself would retry for a
    minute and then end the whole process with a fatal log, so the CLI's one-line error would never be said."""
    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address)
    if not match:  # "auto" or "ray://...": Ray says what it cannot find
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                              f"({exc.strerror or exc}); is `ray start --head` running on that host and port?") from None


# Ray takes 127.0.0.1 as "this host" and swaps in the host's reachable IP, then its servers (GCS, raylet, workers)
# listen on every interface (seen with Ray 2.60: ``services.resolve_ip_for_localhost``). Where Ray runs no clusters
# (macOS, Windows) it keeps the loopback address instead; a local run asks for that behaviour while it starts Ray.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def loopback_only():
    """While the local Ray starts, ask it to listen on 127.0.0.1 alone: the setting for the processes it starts
    (its raylet's workers inherit it), and Ray's constant in this process, read when Ray was imported. Both are
    put back afterwards, so that a later ``ray.init`` in this process (a cluster's address) is left as Ray has it."""
    from ray._private import ray_constants

    saved_env = {key: os.environ.get(key) for key in LOOPBACK_ONLY}
    saved_constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ.update(LOOPBACK_ONLY)
    if saved_constant is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_constant is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_constant


def init_ray(address: str | None, dashboard: bool = False, min_cpus: int = 1) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    if address:
        answers(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
        except ConnectionError as exc:  # the CLI makes this one line (exit 2)
            raise ConnectionError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
        return
    with loopback_only():
        ray.init(
            address="local",  # a Ray of its own, even where this host runs a cluster (`ray start`) it would join
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=dashboard,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": WORKER_ENV},
            log_to_driver=False,
            configure_logging=False,
        )


def device_for(tp: int, wanted: str) -> tuple[bool, str]:
    """(use GPUs?, why not runnable) for a TP group: never fall back to CPU for want of GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if wanted == "cpu" or (wanted == "auto" and gpus == 0):
        return False, ""
    if gpus < tp:
        return True, (f"TP={tp} needs {tp} GPUs; the Ray cluster has {gpus} (cluster.device: cpu runs it on CPUs; "
                      f"{RESUMABLE_SKIP})")
    return True, ""


def workers_platform(device: str, address: str | None, dashboard: bool = False) -> Platform:
    """The hardware the sweep's workers run on, for planning (PassConfig resolves once, on it, and the workers
    compile exactly that). ``cluster.device: cpu``: CPUs, whatever this machine has. A local run: this machine. A
    cluster (``address``): one worker is asked, on a GPU where the cluster has any, since the driver's node (often a
    CPU-only head) says nothing about them. A cluster is joined here, so one that does not answer is said before
    any work."""
    if address:
        init_ray(address, dashboard)
    if device == "cpu":
        return Platform.detect().on_cpu()
    if not address:
        return Platform.detect()
    on_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    ask = ray.remote(num_cpus=0 if on_gpu else 1, num_gpus=1 if on_gpu else 0)(_detect_platform)
    return ray.get(ask.remote())


def _detect_platform() -> Platform:
    return Platform.detect()


def job_for(plan: Plan, config: PlannedConfig, num_tokens: list[int] | None = None) -> Job:
    measure = plan.spec.measure
    return Job(config.config_id, config.pass_config, plan.spec.optimization_level, plan.model.to_dict(),
               list(num_tokens or config.num_tokens or plan.spec.num_tokens), measure.warmup, measure.repeats,
               measure.seed,
               role=config.role, max_repeats=measure.max_repeats, settle=measure.settle,
               profile=measure.profile and not config.reference_only,
               compile_cache=measure.compile_cache, collectives=plan.spec.collectives.model_dump(),
               platform=target_platform(plan.model, config.tp, plan.platform),
               paired_with=_paired_with(plan, config) if measure.paired else None)


def _paired_with(plan: Plan, config: PlannedConfig) -> dict[str, Any] | None:
    """All-off's PassConfig for a config timed against it in rounds (every config but all-off's first
    measurement, which is the reference: all-off again is the A/A pair)."""
    if config.role not in (Role.CONFIG, Role.BASELINE_AGAIN):
        return None
    baseline = next((c for c in plan.configs if c.tp == config.tp and c.is_baseline), None)
    return dict(baseline.pass_config) if baseline is not None else None


class Left(NamedTuple):
    """A config of a batch that died, run again alone at the sizes the batch had not finished."""

    config: PlannedConfig
    num_tokens: list[int]


class Recorder:
    """Writes what a config's job produced into the run folder: its log, rows, per-kernel times and traces. A
    config measured in parts (a batch's sizes as they stream, then a rerun of the rest) is reported done
    (``on_config``) once, with all its rows, when its last part is in; every part's rows go to ``on_rows`` as they
    are written (the CLI's progress by size: a paired batch's config is done only after its last size)."""

    def __init__(self, plan: Plan, folder: RunFolder, on_config=None, on_rows=None):
        self.plan, self.folder, self.on_config, self.on_rows = plan, folder, on_config, on_rows
        self.parts: dict[tuple[str, int], list[dict[str, Any]]] = {}  # rows of configs not yet done

    def record(self, outcome: Outcome, config: PlannedConfig | None = None, log: bool = True, done: bool = True,
               num_tokens: list[int] | None = None) -> list[dict[str, Any]]:
        """``num_tokens``: the sizes the job measured, where it failed without results (else every size)."""
        config = config or outcome.tag
        per_rank = outcome.per_rank
        if log:
            self.write_log(config, outcome.log, outcome.error)
        if config.reference_only:
            return []  # its rows exist from the interrupted run
        rows = rows_for(self.plan, config, per_rank, error=outcome.error, device=outcome.device, sizes=num_tokens)
        if per_rank:
            self.folder.append_kernels(kernel_rows(config, per_rank))
            for result in per_rank[0]:
                if result.trace:
                    self.folder.write_trace(f"{config.config_id}-tp{config.tp}-n{result.num_tokens}", result.trace)
        self.folder.append(rows)
        if self.on_rows and rows:
            self.on_rows(config, rows)
        self.parts.setdefault((config.config_id, config.tp), []).extend(rows)
        return self.finish(config) if done else rows

    def finish(self, config: PlannedConfig) -> list[dict[str, Any]]:
        """A config is done: all its rows, said to ``on_config``."""
        rows = self.parts.pop((config.config_id, config.tp), [])
        if self.on_config:
            self.on_config(config, rows)
        return rows

    def record_batch(self, outcome: Outcome) -> None:
        """A batch's rows at the sizes this outcome holds, config by config; at its end, its one log (a batch that
        died is reported in ``write_batch_log`` alone: its configs are not done until their rerun)."""
        if not outcome.partial:
            self.write_batch_log(outcome.tag, outcome.log, outcome.error)
        for index, config in enumerate(outcome.tag):
            per_rank = [results[index] for results in outcome.per_rank]
            self.record(Outcome(config, per_rank, outcome.error, device=outcome.device), log=False,
                        done=not outcome.partial)

    def write_batch_log(self, configs: list[PlannedConfig], log: str, error: str) -> None:
        names = "\n".join(f"#   {c.label} ({c.config_id})" for c in configs)
        text = f"# TP={configs[0].tp}, {len(configs)} configs timed together:\n{names}\n{log}"
        if error:
            text += f"\nthe batch failed, so its configs run one at a time: {error}\n"
        self.folder.write_log(f"tp{configs[0].tp}-together-{configs[0].config_id}-and-{len(configs) - 1}", text)

    def write_log(self, config: PlannedConfig, log: str, error: str) -> None:
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", config.label)[:80]
        text = f"# TP={config.tp} {config.label} ({config.config_id})\n{log}"
        if error:
            text += f"\nfailed: {error}\n"
        self.folder.write_log(f"tp{config.tp}-{name}-{config.config_id}", text)


class OtherMachine(RuntimeError):
    """A resumed run whose TP groups run on another kind of device than the rows already in its folder."""


def machine_kind(device: str) -> str:
    """A device name without what varies between runs on one machine (a CPU's core and thread counts)."""
    return device.split(" (")[0]


def check_same_machine(folder: RunFolder, tp: int, devices) -> None:
    """Refuse to add rows measured on ``devices`` to a folder whose rows at this TP size came from another kind of
    device: timings compare only within one machine kind, and a resume on whatever machine a call lands on (an
    H100's run folder resumed on an H200) would mix them in one table. Raises ``OtherMachine``."""
    earlier = {machine_kind(r["device"]) for r in folder.rows()
               if r.get("tp") == tp and r.get("status") == "ok" and r.get("device")}
    now = {machine_kind(d) for d in devices if d}
    if earlier and now and not earlier & now:
        raise OtherMachine(f"{folder.path} holds TP={tp} rows measured on {', '.join(sorted(earlier))}, and this "
                           f"run's TP={tp} group is on {', '.join(sorted(now))}: timings compare only within one "
                           "kind of machine, so resume there, or give this machine its own --out")


def run_configs(plan: Plan, pool: GroupPool, recorder: Recorder, configs: list[PlannedConfig]) -> None:
    """The first config (the baseline, or a resumed run's reference-only baseline) alone, then the rest on
    whichever group is free: one at a time, or with ``measure.paired`` in batches timed together (``batches``). A
    batch that dies as a whole (a crash, a hang) is run again one config at a time, so that the config at fault is
    the one recorded as failed."""
    queue = list(configs)
    first = queue.pop(0)
    outcome = pool.run_first(job_for(plan, first), first)
    check_same_machine(recorder.folder, first.tp, pool.devices)  # before this run records anything
    recorder.record(outcome)
    measure = plan.spec.measure
    work = batches(queue, pool.size, measure.batch_size) if measure.paired else [[c] for c in queue]

    def ask():
        if not work:
            return None
        batch = work.pop(0)
        if len(batch) == 1:
            return [(job_for(plan, batch[0]), batch[0])]
        return [([job_for(plan, c) for c in batch], batch)]

    def tell(outcome):
        if isinstance(outcome.tag, Left):
            recorder.record(outcome, outcome.tag.config, num_tokens=outcome.tag.num_tokens)
            return []
        if not isinstance(outcome.tag, list):
            recorder.record(outcome)
            return []
        if outcome.per_rank is None:  # the batch died: the sizes it had not finished, config by config
            recorder.write_batch_log(outcome.tag, outcome.log, outcome.error)
            left = [n for n in (outcome.tag[0].num_tokens or plan.spec.num_tokens) if n not in outcome.measured]
            if not left:
                for config in outcome.tag:
                    recorder.finish(config)
                return []
            return [(job_for(plan, c, left), Left(c, left)) for c in outcome.tag]
        recorder.record_batch(outcome)
        return []

    pool.drive(ask, tell)


def batches(configs: list[PlannedConfig], groups: int, size: int | None = None) -> list[list[PlannedConfig]]:
    """``measure.paired``: the configs of a TP size in as many batches as there are TP groups (more where a batch
    would hold over ``size``), each timed in shared rounds with all-off by one group, run k's before run k + 1's
    (all-off again, the A/A pair, with the last)."""
    last = max((c.run for c in configs), default=1)
    out: list[list[PlannedConfig]] = []
    for run in sorted({c.run for c in configs}):
        in_run = [c for c in configs if (last if c.baseline_repeat else c.run) == run]
        for sizes in dict.fromkeys(c.num_tokens for c in in_run):  # a batch times its configs at the same sizes
            mine = [c for c in in_run if c.num_tokens == sizes]
            count = min(max(groups, math.ceil(len(mine) / size) if size else 0), len(mine))
            out += [mine[i::count] for i in range(count)]
    return [batch for batch in out if batch]


def run_plan(plan: Plan, folder: RunFolder, address: str | None = None,
             config_timeout_s: float | None = 3600,
             on_config: Callable[[PlannedConfig, list[dict]], None] | None = None,
             worker_cls: type = TPWorker,
             on_rows: Callable[[PlannedConfig, list[dict]], None] | None = None) -> None:
    """Run every planned config, TP size by TP size, baseline first; rows go to ``folder`` as they come (and to
    ``on_rows``, size by size where a config is measured in parts; ``on_config`` once a config is done)."""
    folder.append(skipped_rows(plan))
    if not plan.configs:
        return
    init_ray(address or plan.spec.cluster.address, plan.spec.cluster.dashboard, min_cpus=max(plan.spec.tp))
    resources = ray.cluster_resources()
    folder.update_manifest(cluster_resources={k: resources[k] for k in ("CPU", "GPU") if k in resources})
    devices_seen: dict[str, list[str]] = {}
    groups_used: dict[str, int] = {}
    for tp in sorted({c.tp for c in plan.configs}):
        configs = sorted(plan.configs_for(tp), key=lambda c: (not c.is_baseline, c.baseline_repeat))
        use_gpu, unrunnable = device_for(tp, plan.spec.cluster.device)
        if unrunnable:
            for config in configs:
                if config.reference_only:
                    continue
                rows = [{**row, "status": "skipped", "error": unrunnable} for row in rows_for(plan, config, None)]
                folder.append(rows)
                if on_rows:
                    on_rows(config, rows)
                if on_config:
                    on_config(config, rows)
            continue
        groups = groups_to_use(tp, use_gpu, plan.spec.cluster.groups, len(configs))
        pool = GroupPool(tp, use_gpu, groups, config_timeout_s, worker_cls)
        try:
            run_configs(plan, pool, Recorder(plan, folder, on_config, on_rows), configs)
        finally:
            pool.shutdown()
        devices_seen[str(tp)] = sorted(pool.devices)
        groups_used[str(tp)] = groups
        folder.update_manifest(devices=devices_seen, groups=groups_used)
