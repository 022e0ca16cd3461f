"""TP groups on Ray, and a pool of them that runs jobs on whichever group is free and survives bad jobs.

A group is one actor per TP rank, placed together (one placement group, STRICT_PACK: one node) and joined in a
process group (gloo on CPUs, NCCL on GPUs). The pool's first job (the all-off baseline) runs alone; its outputs,
which every later job is checked against, then seed each further group. A job that hangs past the timeout, kills
an actor, or raises out of the worker ends as a failed ``Outcome``; its group is torn down and the next job gets
a fresh one. The sweep launcher and the tuner both drive their jobs through a pool.

Several jobs timed together (a ``measure.paired`` batch) stream: every rank yields each size's results as it
finishes it (``TPWorker.time_together``), and the pool hands each size on as soon as every rank has it (an
``Outcome`` with ``partial`` set), so a batch that dies or runs out of time keeps what it measured. Each rank's
stream is read on a thread of its own (``RankStream``): Ray drops a streamed item its caller has not taken yet when
the actor dies, and the driver's loop can be busy for seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .jobs import Job, RankResult
from .worker import TPWorker

POLL_S = 0.5


class TPGroup:
    """The actors of one TP group. Construction only asks Ray for the placement and the actors; ``ready()`` waits
    for the process group, so several groups can form at once."""

    def __init__(self, tp: int, use_gpu: bool, threads: int | None, worker_cls: type = TPWorker):
        self.tp = tp
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK")
        self.placed = self.pg.ready()
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

    def formed(self) -> bool:
        """Whether Ray has placed the group (without waiting: a node may have left, and it may never be)."""
        return bool(ray.wait([self.placed], timeout=0)[0])

    def ready(self, timeout_s: float = 600) -> "TPGroup":
        ray.get(self.placed, timeout=timeout_s)
        init_method = ray.get(self.actors[0].rendezvous_address.remote(), timeout=timeout_s)
        self.devices = ray.get([a.init_process_group.remote(init_method) for a in self.actors], timeout=timeout_s)
        return self

    def submit(self, job: Job | list[Job]) -> list:
        """Every rank runs ``job`` (one ref each), or, given several, times them in shared rounds and streams each
        size's results (one ``ObjectRefGenerator`` each: ``TPWorker.time_together``)."""
        if isinstance(job, list):
            return [a.time_together.options(num_returns="streaming").remote(job) for a in self.actors]
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


@dataclass
class Outcome:
    """How one job ended: every rank's results, or the error that ended it (and then no results). For jobs timed
    together (a list), ``per_rank`` holds per rank, per job, the results of the sizes not handed on before: a
    ``partial`` outcome comes as each size ends, then the last one (done, or failed with ``measured`` naming the
    sizes already handed on)."""

    tag: Any  # what the caller submitted the job with
    per_rank: list[list[RankResult]] | None
    error: str = ""
    log: str = ""
    device: str = ""
    partial: bool = False
    measured: list[int] = field(default_factory=list)


class RankStream:
    """One rank's stream of a batch (one step per size), read on a thread of its own as its items come. Ray drops a
    streamed item its caller had not taken when the actor dies (Ray 2.60: the death's error comes in its place, as
    Ray's generator docs allow for a system failure), and the driver's loop may be busy for seconds meanwhile
    (forming a group, reading logs): a dying batch keeps the sizes it finished only if each is taken on arrival."""

    def __init__(self, stream, arrived: threading.Event):
        self._steps: list = []
        self._ended = False  # the stream finished
        self._error = ""  # what ended it otherwise: the rank raised, died or was killed
        self._lock = threading.Lock()
        self._arrived = arrived
        self._thread = threading.Thread(target=self._read, args=(stream,), name="fusiontune-rank-stream",
                                        daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for ref in stream:
                step = ray.get(ref)
                with self._lock:
                    self._steps.append(step)
                self._arrived.set()
        except Exception as exc:  # noqa: BLE001 - a rank that raised or died ends the batch
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            with self._lock:
                self._ended = True
        self._arrived.set()

    def state(self) -> tuple[list, bool, str]:
        """(the steps so far, whether the stream finished, the error that ended it), read together."""
        with self._lock:
            return list(self._steps), self._ended, self._error

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)


@dataclass
class _InFlight:
    group: TPGroup
    tag: Any
    refs: list
    started: float
    timeout_s: float | None
    checked: set = field(default_factory=set)  # refs seen ready without an error
    # jobs timed together: refs are ObjectRefGenerators, each read by a RankStream; the steps handed on
    streams: list[RankStream] | None = None
    jobs: int = 1
    sent: int = 0


class GroupPool:
    """Up to ``size`` TP groups of ``tp`` ranks; see the module docstring."""

    def __init__(self, tp: int, use_gpu: bool, size: int, timeout_s: float | None, worker_cls: type = TPWorker):
        self.tp, self.use_gpu, self.size, self.timeout_s, self.worker_cls = tp, use_gpu, size, timeout_s, worker_cls
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.threads = None if use_gpu else max(1, cpus // (tp * size))
        self.idle: list[TPGroup] = []
        self.starting: list[TPGroup] = []
        self.busy: list[_InFlight] = []
        self.ended: list[Outcome] = []  # jobs that ended without running (their group would not form)
        self.devices: set[str] = set()
        self.baseline_job: Job | None = None
        self.baseline_ref = None  # the all-off outputs, in the driver's object store
        self.arrived = threading.Event()  # a streamed step (or a stream's end) came in

    def run_first(self, job: Job, tag: Any) -> Outcome:
        """Run ``job`` alone on one group while the other groups' actors start; if it is the baseline (or a
        reference-only baseline), its outputs seed every group formed from then on."""
        self.submit(job, tag)
        self.starting += [TPGroup(self.tp, self.use_gpu, self.threads, self.worker_cls) for _ in range(self.size - 1)]
        outcome = self.next_done()
        if job.is_baseline and self.idle:
            # Copied out of the worker, so that a lost group does not take the reference with it.
            self.baseline_job = job
            self.baseline_ref = ray.put(ray.get(self.idle[0].actors[0].baseline_outputs.remote(job.model, job.seed),
                                                timeout=600))
        return outcome

    def drive(self, ask: Callable[[], list[tuple[Job, Any]] | None],
              tell: Callable[[Outcome], list[tuple[Job, Any]]]) -> None:
        """Keep the groups busy until a source of jobs is done: the one scheduling loop of sweeps and tunes alike.
        While a group has room, the jobs ``tell`` returned for a finished one (a config's next stage) go first, then
        ``ask``'s: the next jobs, [] when it had none to run this time, None when it will have no more. Every job
        that ends goes to ``tell``."""
        follow: list[tuple[Job, Any]] = []
        more = True
        while True:
            while (follow or more) and self.has_room():
                if follow:
                    self.submit(*follow.pop(0))
                    continue
                jobs = ask()
                if jobs is None:
                    more = False
                else:
                    follow.extend(jobs)
            if self.pending():
                follow.extend(tell(self.next_done()))
            elif not (follow or more):
                return

    def has_room(self) -> bool:
        """Whether a job can start now: an idle group, a group Ray has placed, or nothing running (then waiting for
        a group to form is all there is to do). A group that cannot be placed (its node left the cluster, or a
        torn-down group's replacement waits for room) never stalls the groups that can work."""
        if len(self.busy) >= self.size:
            return False
        return bool(self.idle) or not self.busy or any(group.formed() for group in self.starting)

    def pending(self) -> bool:
        return bool(self.busy or self.ended)

    def submit(self, job: Job | list[Job], tag: Any) -> None:
        """Start ``job`` (several: timed together, with the timeout of each in all) on a free group."""
        timeout_s = self.timeout_s * len(job) if self.timeout_s is not None and isinstance(job, list) else self.timeout_s
        try:
            group = self.idle.pop() if self.idle else self._new_group()
        except Exception as exc:  # noqa: BLE001 - no group: the job ends here, with the reason
            self.ended.append(Outcome(tag, None, f"{type(exc).__name__}: the TP group would not form: {exc}"))
            return
        item = _InFlight(group, tag, group.submit(job), time.monotonic(), timeout_s)
        if isinstance(job, list):
            item.streams, item.jobs = [RankStream(stream, self.arrived) for stream in item.refs], len(job)
        self.busy.append(item)

    def _new_group(self) -> TPGroup:
        formed = [g for g in self.starting if g.formed()]
        if formed or self.starting:
            group = formed[0] if formed else self.starting[0]
            self.starting.remove(group)
        else:
            group = TPGroup(self.tp, self.use_gpu, self.threads, self.worker_cls)
        try:
            group.ready()
            if self.baseline_ref is not None:
                group.load_baseline(self.baseline_job, self.baseline_ref)
        except Exception:
            group.shutdown()  # or its placement, once Ray makes it, holds a node's room for a group never used
            raise
        self.devices.update(group.devices)
        return group

    def next_done(self) -> Outcome:
        """Block until some job ends (done, failed or timed out) and return how; its group is free again, or
        replaced when the job's end leaves it unusable (a dead or stuck rank)."""
        if self.ended:
            return self.ended.pop(0)
        while True:
            self.arrived.clear()  # before looking, so that a step arriving meanwhile wakes the wait below
            for item in list(self.busy):
                outcome = self._check(item)
                if outcome is not None:
                    return outcome
            if any(item.streams is not None for item in self.busy):
                self.arrived.wait(POLL_S)  # a batch's readers say when a step comes (other jobs: every POLL_S)
            else:
                ray.wait([ref for item in self.busy for ref in item.refs], num_returns=1, timeout=POLL_S)

    def _check(self, item: _InFlight) -> Outcome | None:
        if item.streams is not None:
            return self._check_stream(item)
        ready, _ = ray.wait(item.refs, num_returns=len(item.refs), timeout=0)
        done = len(ready) == len(item.refs)
        timed_out = item.timeout_s is not None and time.monotonic() - item.started > item.timeout_s
        # A rank that died ends the job now: its peers may wait in a collective until the timeout.
        crashed = "" if done else _first_error(ready, item.checked)
        if not (done or timed_out or crashed):
            return None
        self.busy.remove(item)
        per_rank, error = None, crashed
        if not error and not done:
            error = f"timed out: the config ran past {item.timeout_s:.0f} s (--config-timeout)"
        elif done:
            try:
                per_rank = ray.get(item.refs)
            except Exception as exc:  # noqa: BLE001 - a dead actor, a task that raised
                error = f"{type(exc).__name__}: {exc}"[:2000]
        return self._ended(item, per_rank, error)

    def _ended(self, item: _InFlight, per_rank, error: str, measured: list[int] | None = None) -> Outcome:
        """The job's last outcome; its group back to idle, or, without results, replaced."""
        if per_rank is None:  # its actors may be dead or stuck in a collective: replace the group
            item.group.shutdown()
            self.starting.append(TPGroup(self.tp, self.use_gpu, self.threads, self.worker_cls))  # forms meanwhile
            log = "(no worker log: the group was torn down)\n"
        else:
            log = item.group.logs()
            self.idle.append(item.group)
        return Outcome(item.tag, per_rank, error, log, item.group.devices[0] if item.group.devices else "",
                       measured=measured or [])

    def _check_stream(self, item: _InFlight) -> Outcome | None:
        """Jobs timed together: take what every rank streamed; hand on the sizes all ranks finished (partial),
        then the end: done, or failed (a rank's error, a dead actor, the timeout) with the sizes handed on."""
        states = [stream.state() for stream in item.streams]
        steps = [rank_steps for rank_steps, _, _ in states]
        finished = all(ended for _, ended, _ in states)
        error = next((error for _, _, error in states if error), "")
        complete = min(len(rank_steps) for rank_steps in steps)
        if complete > item.sent:  # first what every rank finished, whatever follows
            fresh, item.sent = _per_job(steps, item.sent, complete, item.jobs), complete
            if not finished or error:
                return Outcome(item.tag, fresh, device=item.group.devices[0] if item.group.devices else "",
                               partial=True)
        else:
            fresh = None
        timed_out = item.timeout_s is not None and time.monotonic() - item.started > item.timeout_s
        if finished and not error:
            self.busy.remove(item)
            return self._ended(item, fresh or _per_job(steps, item.sent, item.sent, item.jobs), "")
        if not (error or timed_out):
            return None
        self.busy.remove(item)
        error = error or f"timed out: the configs ran past {item.timeout_s:.0f} s (--config-timeout)"
        measured = [step[0].num_tokens for step in steps[0][:item.sent] if step]
        return self._ended(item, None, error, measured)

    def shutdown(self) -> None:
        for group in self.idle + self.starting + [item.group for item in self.busy]:
            group.shutdown()
        for stream in [stream for item in self.busy for stream in item.streams or []]:
            stream.join(timeout_s=5)  # its actor was killed: its reader ends, before Ray itself may shut down
        self.idle, self.starting, self.busy = [], [], []


def _per_job(steps: list[list], start: int, stop: int, jobs: int) -> list[list[list[RankResult]]]:
    """Streamed steps ``start:stop`` (per rank, per size: each of ``jobs`` results) as per rank, per job, per
    size."""
    return [[[rank_steps[k][job] for k in range(start, stop)] for job in range(jobs)] for rank_steps in steps]


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


def group_capacity(tp: int, use_gpu: bool, nodes: list[dict] | None = None) -> int:
    """How many TP groups of ``tp`` ranks fit at once, each on one node (STRICT_PACK)."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive", True)]
    key = "GPU" if use_gpu else "CPU"
    return sum(int(n.get("Resources", {}).get(key, 0)) // tp for n in nodes)


def groups_to_use(tp: int, use_gpu: bool, wanted: str | int, jobs: int) -> int:
    """``cluster.groups`` made concrete: auto is what the GPUs hold (one on CPUs, where groups would share cores
    and disturb each other's timings); never more than fit, nor more than there are jobs."""
    capacity = max(1, group_capacity(tp, use_gpu))
    limit = capacity if wanted == "auto" and use_gpu else (1 if wanted == "auto" else min(int(wanted), capacity))
    return max(1, min(limit, jobs))
