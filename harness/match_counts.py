"""Which fusions fired in a compiled graph, also when Inductor served the graph from its cache.

A pass counts its matches while Inductor compiles a graph. A graph served from Inductor's FX-graph cache runs no
pass, so the counts are saved beside the cache when the graph is compiled (``MatchCounts``, under the inputs to
the cache key that we control) and read back on a hit. A hit whose counts were never saved (a graph compiled by
something other than a fusiontune worker) is an ``UnrecordedCacheHit``: the worker compiles that range afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from fusiontune.passes.fusions import PASSES
from fusiontune.passes.manager import PassManager


class UnrecordedCacheHit(RuntimeError):
    """A cached graph whose match counts are unknown (compiled by something other than a fusiontune worker)."""


class MatchCounts:
    """The match counts of one compiled graph, kept beside Inductor's cache under the same inputs to its key
    that we control (the passes' uuid: config and pass/kernel sources; the model; static or dynamic shapes)."""

    def __init__(self, manager: PassManager, model: tuple | None, dynamic: bool):
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        key = json.dumps([manager.uuid(), repr(model), dynamic, torch.__version__])
        self.path = Path(cache_dir()) / "fusiontune-match-counts" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def save(self, matches: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(matches))
        tmp.replace(self.path)

    def load(self, wait_s: float = 0.0) -> dict[str, int]:
        """The recorded counts; ``wait_s``: how long to wait for them to appear (another rank of the group may be
        saving them)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):
                if time.monotonic() >= deadline:
                    raise UnrecordedCacheHit("Inductor served this graph from its cache, but no match counts were "
                                             "recorded when it was compiled") from None
                time.sleep(0.05)


def first_call_marks(manager: PassManager) -> dict[str, Any]:
    """What to compare after a size's first call: the passes' counts so far and how many graphs Dynamo traced."""
    return {**manager.snapshot(), "traced": counters["stats"]["unique_graphs"]}


def matches_of_first_call(manager: PassManager, before: dict[str, Any], recorded: MatchCounts,
                          last: dict[str, int], wait_s: float = 0.0
                          ) -> tuple[dict[str, int], str, UnrecordedCacheHit | None]:
    """The match counts of the graph a size's first call ran, and where they come from: "compiled" (the passes
    ran now; the counts are saved for a later cache hit), "cache" (Inductor's cache served it: the saved counts;
    with an ``UnrecordedCacheHit`` and ``last`` where none were saved) or "reused" (the range's graph, compiled
    at an earlier size: ``last``)."""
    after = manager.snapshot()
    if after["graphs"] > before["graphs"]:
        counts = {spec.flag: after[spec.flag] - before[spec.flag] for spec in PASSES}
        recorded.save(counts)
        return counts, "compiled", None
    if counters["stats"]["unique_graphs"] > before["traced"]:  # traced anew, no pass ran: a cache hit
        try:
            return recorded.load(wait_s), "cache", None
        except UnrecordedCacheHit as exc:
            return last, "cache", exc
    return last, "reused", None
