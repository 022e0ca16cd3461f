"""The one pass manager: installed as Inductor's ``post_grad_custom_post_pass``, it runs every enabled pass in the
order ``fusions.PASSES`` declares and counts matches per pass.

Inductor folds ``uuid()`` into its cache key. Ours hashes the resolved config and the source of every pass module,
so a graph compiled under other passes (or an older version of a pass) is never served from the cache.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import Counter
from pathlib import Path

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import ResolvedPassConfig
from .fusions import PASSES, PassSpec

_PASSES_DIR = Path(__file__).parent
_KERNELS_DIR = _PASSES_DIR.parent / "kernels"


def load_pass(spec: PassSpec, config: ResolvedPassConfig):
    module_name, class_name = spec.implementation.split(":")
    module = importlib.import_module(f"fusiontune.passes.{module_name}")
    return getattr(module, class_name)(config)


def _source_hash() -> str:
    digest = hashlib.sha256()
    for directory in (_PASSES_DIR, _KERNELS_DIR):
        for path in sorted(directory.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class PassManager(CustomGraphPass):
    def __init__(self, config: ResolvedPassConfig):
        self.config = config
        self.passes = [(spec.flag, load_pass(spec, config)) for spec in PASSES if config.values[spec.flag]]
        self.matches: Counter[str] = Counter({spec.flag: 0 for spec in PASSES})
        self.graphs_seen = 0
        self._uuid = hashlib.sha256(f"{config.key()}:{_source_hash()}".encode()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        self.graphs_seen += 1
        for flag, run in self.passes:
            self.matches[flag] += run(graph)
        graph.lint()

    def uuid(self) -> str:
        return self._uuid

    def snapshot(self) -> dict[str, int]:
        """Match counts so far, and how many graphs the passes saw (a cached graph is not seen)."""
        return {**self.matches, "graphs": self.graphs_seen}
