"""One tensor-parallel rank: builds the model shard, compiles it under a PassConfig, measures each num_tokens.

The launcher wraps ``TPWorker`` as a Ray actor (one per rank), but nothing here depends on Ray, so a worker can be
driven in-process too (tests, debugging). Every rank of a group runs the same jobs in the same order.

Compiled graphs are cached across num_tokens (one dynamic-shape graph per range) and across runs (Inductor's FX
graph and AOTAutograd caches, ``measure.compile_cache``). A graph served from Inductor's cache skips the post-grad
passes, so their match counts would read zero for a fusion that did fire: ``match_counts`` records them beside
Inductor's cache at every fresh compile and reads them back on a hit.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from fusiontune.kernels import implementations, symm_mem
from fusiontune.kernels.attention import rounds_otherwise
from fusiontune.passes.config import resolve
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform
from fusiontune.passes.ranges import compile_ranges, range_for

from .correctness import max_abs_error, tolerance
from .host_load import HostLoad, group_pids
from .jobs import Job, RankResult
from .match_counts import MatchCounts, UnrecordedCacheHit, first_call_marks, matches_of_first_call
from .model import DecoderStack, ModelConfig
from .process_group import RankGroup
from .profile import profile_forward
from .timing import gpu_state, time_forward, time_rounds


def planned_platform(planned: Platform | None, here: Platform) -> Platform:
    """The platform a job resolves PassConfig on: the one it was planned on, so that the config measured is the
    config planned (its id, label and duplicate check were computed from that resolution). A rank whose hardware
    differs refuses the job: resolving again here would compile another config under the planned one's name."""
    if planned is None:
        return here
    if planned.hardware() != here.hardware():
        raise RuntimeError(f"this config was planned for {planned.hardware()}, but this rank runs on "
                           f"{here.hardware()}: plan where the workers run (--address joins their cluster and asks "
                           "one of them)")
    return planned


class TPWorker:
    """One rank (a Ray actor in a sweep): its place in the group (``process_group.RankGroup``), the model shard it
    builds once per model and the all-off outputs it checks against, and the jobs it runs."""

    def __init__(self, rank: int, world_size: int, num_threads: int | None = None, device: str = "auto"):
        self.place = RankGroup(rank, world_size, device)
        self.rank, self.world_size, self.device = rank, world_size, self.place.device
        if hasattr(signal, "SIGUSR1"):  # `kill -USR1` prints every thread's stack to stderr: where a hung job waits
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.baseline: dict[tuple, torch.Tensor] = {}  # (model_key, num_tokens) -> the all-off output
        self.log_lines: list[str] = []  # the last job's log
        self._model_key: tuple | None = None
        self._model: DecoderStack | None = None
        self._cache = True  # the running job's compile_cache
        self._host = HostLoad([os.getpid()])  # the host's CPU time beyond the TP group's, per timed size

    # -- process group (called through Ray by groups.TPGroup) ---------------------------------------------
    def rendezvous_address(self) -> str:
        return self.place.rendezvous_address()

    def init_process_group(self, init_method: str) -> str:
        self.place.join(init_method)
        self._host = HostLoad(group_pids(self.group))  # a collective, on every rank at once
        return self.place.device_name()

    @property
    def group(self):
        return self.place.group

    @property
    def group_name(self) -> str | None:
        return self.place.group_name

    def shutdown(self) -> None:
        self.place.leave()

    # -- one job -------------------------------------------------------------------------------------------
    def model_for(self, cfg: ModelConfig, seed: int) -> DecoderStack:
        key = model_key(cfg.to_dict(), seed)
        if key != self._model_key:
            self._model = None  # free the old shard before building the next
            torch.manual_seed(seed)
            model = DecoderStack(cfg, self.world_size, self.rank, self.group_name, seed, self.device)
            # 64 tokens, or fewer where a decode step of 64 sequences would not fit the cache
            fits = [n for n in (64, 16, 4, 1) if cfg.cache_problem(n) is None]
            if not fits:
                raise ValueError(cfg.cache_problem(1))
            calibration = self.inputs(cfg, fits[0], seed=seed + 7919)
            model.calibrate_static_scales(calibration)
            self._model, self._model_key = model, key
        return self._model

    def inputs(self, cfg: ModelConfig, num_tokens: int, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(seed * 100003 + num_tokens)
        return torch.randn(num_tokens, cfg.hidden_size, generator=generator, device=self.device).to(cfg.torch_dtype)

    def baseline_outputs(self, model: dict[str, Any], seed: int) -> dict[int, torch.Tensor]:
        """The all-off outputs this worker holds for a model, on the CPU (to seed another TP group)."""
        key = model_key(model, seed)
        return {n: out.cpu() for (k, n), out in self.baseline.items() if k == key}

    def load_baseline(self, model: dict[str, Any], seed: int, outputs: dict[int, torch.Tensor]) -> int:
        """Take all-off outputs measured by another group (every rank's output is the whole hidden state)."""
        key = model_key(model, seed)
        for num_tokens, out in outputs.items():
            self.baseline[(key, num_tokens)] = out.to(self.device)
        return len(outputs)

    def job_log(self) -> str:
        return "".join(self.log_lines)

    def log(self, message: str) -> None:
        """A line of the job's log; also on stderr (Ray keeps it in the node's worker log even when the job hangs
        and its log never comes back)."""
        line = f"{time.strftime('%H:%M:%S')} rank {self.rank}: {message}\n"
        self.log_lines.append(line)
        print(line, end="", file=sys.stderr, flush=True)

    def run(self, job: Job) -> list[RankResult]:
        """Measure every num_tokens of ``job``. A failure to build or compile fails them all; a failure at one
        size (out of memory, a kernel error) fails that size only. Failures are returned, never raised."""
        return self.run_together([job])[0]

    def run_together(self, jobs: list[Job]) -> list[list[RankResult]]:
        """Measure several configs of one model over the same num_tokens (``measure.paired``: each job's
        ``paired_with`` is all-off), each size's forwards timed in shared rounds with all-off, so that drift hits
        them all alike; per job, what ``run`` returns. The jobs differ only in their PassConfig: one model, one
        set of weights, a compiled variant each. Each config fails alone, as in ``run``."""
        per_job: list[list[RankResult]] = [[] for _ in jobs]
        for step in self.time_together(jobs):
            for results, result in zip(per_job, step):
                results.append(result)
        return [sorted(results, key=lambda r: r.num_tokens) for results in per_job]

    def time_together(self, jobs: list[Job]) -> Iterator[list[RankResult]]:
        """``run_together`` a size at a time: after each num_tokens (largest first), every job's result at it. Ray
        streams these to the launcher (``groups.TPGroup.submit``), which writes a batch's rows size by size, so a
        batch cut short (a crash, a timeout, an interrupted run) keeps the sizes it finished."""
        self.log_lines = []
        lead = jobs[0]
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the thread that runs this job may not be the one that set it
        symm_mem.configure(symm_mem.CollectiveSettings(**lead.collectives))
        for job in jobs:
            self.log(f"job {job.config_id}: {job.pass_config or 'level defaults'} at O{job.optimization_level}, "
                     f"num_tokens {job.num_tokens}" + (" (reference outputs only)" if job.reference_only else "")
                     + _where())
        torch._dynamo.reset()
        # every variant compiles a graph per range on the model's one forward: room for them all, or Dynamo would
        # run the later ones eagerly
        variants = len(jobs) + (lead.paired_with is not None)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * variants)
        configs = [self._prepared(job) for job in jobs]
        try:
            partner = self._partner(lead) if any(c.compiled is not None for c in configs) else None
        except Exception as exc:  # noqa: BLE001 - the configs are still measured, unpaired, and the log says why
            self.log(f"not paired with all-off: {_describe(exc)}")
            partner = None
        try:
            # Largest first: in each range, the first compile is the dynamic-shape graph its smaller sizes reuse.
            for num_tokens in sorted(lead.num_tokens, reverse=True):
                checked = [c for c in configs if self._first_call_checked(c, num_tokens)]
                if checked and not lead.reference_only:
                    self._time_size(lead, checked, partner, num_tokens)
                for config in checked:
                    self.log(_summary(config.results[-1]))
                yield [c.results[-1] for c in configs]  # every config has a result at this size, failed or not
        finally:
            torch._dynamo.reset()

    def _prepared(self, job: Job) -> "_Config":
        """A job's model config, resolved PassConfig, num_tokens ranges and a compiled callable per range; where
        that fails, the error every size of it will carry."""
        config = _Config(job)
        try:
            config.cfg = ModelConfig(**job.model)  # head_dim comes resolved: explicit, same shapes
            config.resolved = self._resolve(job, job.pass_config, config.cfg)
            model = self.model_for(config.cfg, job.seed)
            self._cache = job.compile_cache  # Inductor's fx_graph_cache option governs AOTAutograd's cache too
            config.parts = compile_ranges(config.resolved)
            config.compiled = {part.label: self._compile(model, part) for part in config.parts}
        except Exception as exc:
            config.failed = _describe(exc)
            self.log(f"{job.config_id} failed before measuring: {config.failed}")
            return config
        self.log(f"{job.config_id} ranges: " + _ranges_text(config.parts))
        return config

    def _resolve(self, job: Job, pass_config: dict[str, Any], cfg: ModelConfig):
        """``pass_config`` at the job's level, on the platform the plan resolved it on (else this rank's own)."""
        here = Platform.detect(self.world_size, cfg.hidden_size, cfg.torch_dtype.itemsize, cfg.quant)
        if self.device.type == "cpu":
            here = here.on_cpu()
        return resolve(pass_config, job.optimization_level, planned_platform(job.platform, here))

    def _partner(self, job: Job):
        """All-off's num_tokens ranges and, per range, its compiled callable, for jobs timed against it in rounds
        (``job.paired_with``); None otherwise. Same model, same weights: only the passes differ."""
        if job.paired_with is None or job.reference_only:
            return None
        parts = compile_ranges(self._resolve(job, job.paired_with, self._model.cfg))
        self.log("paired with all-off: " + _ranges_text(parts))
        return parts, {}

    def _partner_for(self, partner, num_tokens: int):
        """All-off's compiled callable for this size (its range compiled at first use), or None."""
        if partner is None:
            return None
        parts, compiled = partner
        part = range_for(parts, num_tokens, self.world_size)
        if part.label not in compiled:
            compiled[part.label] = self._compile(self._model, part)[0]
        return compiled[part.label]

    def _compile(self, model: DecoderStack, part, cache: bool | None = None) -> tuple[Any, PassManager]:
        """A lazily compiled callable for one num_tokens range, with that range's passes, and their manager."""
        manager = PassManager(part.config)
        cache = self._cache if cache is None else cache
        fn = torch.compile(model, fullgraph=True,
                           options={"post_grad_custom_post_pass": manager, "fx_graph_cache": cache})
        return fn, manager

    @torch.no_grad()
    def _first_call_checked(self, config: "_Config", num_tokens: int) -> bool:
        """One size of one config: its first call (compiling, counting matches) and its output checked against
        all-off. Adds the size's result to the config's; whether the size is left to time."""
        job = config.job
        result = RankResult(num_tokens, resolved=dict(config.resolved.values) if config.resolved else {})
        config.results.append(result)
        if config.failed:
            result.error = config.failed
            return False
        try:
            part = range_for(config.parts, num_tokens, self.world_size)
            if part.label not in config.compiled:  # a size SP cannot split: its range less SP, compiled once
                config.compiled[part.label] = self._compile(self._model, part)
            fn, manager = config.compiled[part.label]
            result.compile_range, result.active = part.label, list(part.active)
            problem = config.cfg.cache_problem(num_tokens)
            if problem:
                raise ValueError(problem)
            x = self.inputs(config.cfg, num_tokens, job.seed)
            if num_tokens > 1:  # one dynamic graph per range (the dispatch keeps other sizes out of it)
                torch._dynamo.mark_dynamic(x, 0)
            try:
                out, matches = self._first_call(fn, manager, x, result, config.matches.get(part.label, {}))
            except UnrecordedCacheHit as hit:  # compile this range afresh, its passes running
                self.log(f"num_tokens={num_tokens}: {hit}; compiling range {part.label} without the cache")
                config.compiled[part.label] = fn, manager = self._compile(self._model, part, cache=False)
                out, matches = self._first_call(fn, manager, x, result, {})
            config.matches[part.label] = matches
            self._check(job, config.cfg, out, result)
            result.allreduce_used = symm_mem.take_used()  # what its timed replays run too
            result.attention_used = implementations.take(implementations.ATTENTION)
            result.gemm_used = implementations.take(implementations.GEMM)
            del out
            config.now = fn, x
            return True
        except Exception as exc:
            self._failed_at(result, exc)
            return False

    def _failed_at(self, result: RankResult, exc: BaseException) -> None:
        result.error = _describe(exc)
        self.log(f"num_tokens={result.num_tokens} failed: {result.error}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _first_call(self, compiled, manager: PassManager, x: torch.Tensor, result: RankResult,
                    last_matches: dict[str, int]) -> tuple[torch.Tensor, dict[str, int]]:
        """The size's first call (a compile, unless its range's graph exists) and the match counts of its graph."""
        num_tokens = result.num_tokens
        before = first_call_marks(manager)
        implementations.forget()  # forget what earlier sizes ran
        self.log(f"num_tokens={num_tokens}: first call")
        t0 = time.perf_counter()
        out = compiled(x)
        result.compile_s = time.perf_counter() - t0
        recorded = MatchCounts(manager, self._model_key, dynamic=num_tokens > 1)
        # a sibling rank compiling the same graph saves its counts moments after its first call
        last_matches, source, unrecorded = matches_of_first_call(manager, before, recorded, last_matches,
                                                                 wait_s=30.0 if self.group is not None else 0.0)
        if source == "cache" and unrecorded is None:
            self.log(f"num_tokens={num_tokens}: graph from Inductor's cache; match counts as recorded when it was "
                     f"compiled ({recorded.path.name})")
        if self.place.any_rank(unrecorded is not None):  # every rank compiles afresh, or none does: in step
            raise unrecorded or UnrecordedCacheHit("another rank found a cached graph without match counts")
        result.matches = dict(last_matches)
        return out, last_matches

    def _check(self, job: Job, cfg: ModelConfig, out: torch.Tensor, result: RankResult) -> None:
        """Keep the all-off output (a baseline job), or compare with it (any other)."""
        key = (self._model_key, result.num_tokens)
        if job.is_baseline:
            self.baseline[key] = out.clone()
        if job.reference_only:
            return
        reference = self.baseline.get(key)
        if reference is None:
            result.error = "no baseline output to compare with (the all-off config failed at this size)"
        else:
            result.max_abs_err = max_abs_error(out, reference)
            result.tolerance = tolerance(cfg.torch_dtype, cfg.quant != "none", float(reference.float().abs().max()),
                                         self.world_size, reordered="flashinfer" in symm_mem.used()
                                         or rounds_otherwise(implementations.used(implementations.ATTENTION),
                                                             result.num_tokens))

    @torch.no_grad()
    def _time_size(self, lead: Job, configs: list["_Config"], partner, num_tokens: int) -> None:
        """One size's timed repeats of every config, in shared rounds with all-off's ``partner`` where given (one
        by one if timing them together fails: one config's out-of-memory must not cost the others their size),
        the GPU's state after them, and the profiles."""
        try:
            partner_fn = self._partner_for(partner, num_tokens)
        except Exception as exc:  # noqa: BLE001 - measured unpaired, and the log says why
            self.log(f"num_tokens={num_tokens}: all-off failed to compile, not paired: {_describe(exc)}")
            partner_fn = None
        for group in [configs] if partner_fn is not None else [[c] for c in configs]:
            self._time_or_split(lead, group, partner_fn)
        for config in configs:
            config.now = None

    def _time_or_split(self, lead: Job, configs: list["_Config"], partner) -> None:
        """``_time`` of ``configs``; where that fails, each one alone, so that only the one at fault fails."""
        try:
            self._time(lead, configs, partner)
        except Exception as exc:
            if len(configs) == 1:
                self._failed_at(configs[0].results[-1], exc)
                return
            self.log(f"num_tokens={configs[0].results[-1].num_tokens}: timing {len(configs)} configs together "
                     f"failed ({type(exc).__name__}); timing them one by one")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for config in configs:
                self._time_or_split(lead, [config], partner)

    def _time(self, lead: Job, configs: list["_Config"], partner=None) -> None:
        """The timed repeats of ``configs`` at their current size (in rounds with all-off's ``partner``, where
        given), the host's load and the GPU's state over them, and their profiles."""
        results = [c.results[-1] for c in configs]
        x = configs[0].now[1]
        paired = f" in rounds with all-off ({len(configs)} configs)" if partner is not None else ""
        self.log(f"num_tokens={results[0].num_tokens}: timing{paired}")
        started = self._host.start()
        if partner is None:
            fn = configs[0].now[0]  # unpaired: one config at a time
            results[0].times_ms, results[0].timing = time_forward(fn, x, lead.warmup, lead.repeat_rule,
                                                                  self.device, self.group)
        else:
            per_config, base_ms, how = time_rounds([c.now[0] for c in configs], partner, x, lead.warmup,
                                                   lead.repeat_rule, self.device, self.group,
                                                   seed=lead.seed * 100_003 + results[0].num_tokens)
            for result, times in zip(results, per_config):
                result.times_ms, result.paired_base_ms, result.timing = times, base_ms, how
        implementations.forget()
        other = self._host.other_cpus(started)
        gpu = gpu_state(self.device)
        for config, result in zip(configs, results):
            result.host_other_cpus = float("nan") if other is None else other
            result.gpu = dict(gpu)
            if config.job.profile:
                barrier = (lambda: dist.barrier(group=self.group)) if self.group is not None else None
                fn = config.now[0]
                result.kernels, trace = profile_forward(lambda: fn(x), self.device, barrier=barrier)
                result.trace = trace if self.rank == 0 else b""


@dataclass
class _Config:
    """One job inside ``run_together``: what it compiled, its sizes' results so far, and the size now timed."""

    job: Job
    cfg: ModelConfig | None = None
    resolved: Any = None
    parts: list = field(default_factory=list)
    compiled: dict[str, tuple[Any, PassManager]] | None = None
    failed: str = ""  # why it could not be built or compiled
    matches: dict[str, dict[str, int]] = field(default_factory=dict)  # per range, the match counts of its last size
    results: list[RankResult] = field(default_factory=list)
    now: tuple[Any, torch.Tensor] | None = None  # the compiled callable and input of the size being timed


def _ranges_text(parts) -> str:
    """Each num_tokens range and the passes it compiles with, for the job's log."""
    return "; ".join(f"{p.label}: {', '.join(p.active) or 'no passes'}" for p in parts)


def _where() -> str:
    """Which Ray node this rank runs on (a cluster's logs then say where each group ran); nothing outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return f"; node {ray.get_runtime_context().get_node_id()[:12]} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - a log detail, never a failure
        pass
    return ""


def model_key(model: dict[str, Any], seed: int) -> tuple:
    """What determines a model's weights and outputs: its config and the seed."""
    return tuple(sorted(model.items())), seed


def _summary(result: RankResult) -> str:
    fired = {flag: n for flag, n in result.matches.items() if n}
    times = sorted(result.times_ms)
    timed = (f"median {times[len(times) // 2]:.4f} ms over {len(times)} repeats ({result.timing})"
             if times else "not timed")
    return (f"num_tokens={result.num_tokens}: range {result.compile_range}, first call {result.compile_s:.1f} s, "
            f"matches {fired or 'none'}, max abs err {result.max_abs_err:.3g} (tolerance {result.tolerance:.3g}), "
            f"{timed}" + (f", error: {result.error.splitlines()[0]}" if result.error else ""))


def _describe(exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}".strip()
    return f"{message[:2000]}\n{traceback.format_exc(limit=-3)[-2000:]}"
