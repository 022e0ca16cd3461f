"""What every fusiontune pass is: made with its resolved config, called on an FX graph, it returns how many times
it rewrote it (the match count every row reports). ``GraphPass`` is that contract, for the passes that walk the
graph themselves; ``FusionPass`` is the same through Inductor's pattern matcher. Each pass names the PassConfig
flag it implements (``flag``): the manager's table (``manager.PASS_CLASSES``) links it to its entry in
``fusions.PASSES``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import fx
from torch._inductor.pattern_matcher import PatternMatcherPass

if TYPE_CHECKING:
    from .config import ResolvedPassConfig

log = logging.getLogger("fusiontune.passes")


class GraphPass:
    """A pass that walks the graph itself (collectives, cache writes, no-ops): subclasses implement ``__call__``."""

    flag: str = ""

    def __init__(self, config: ResolvedPassConfig | None = None):
        self.config = config

    def __call__(self, graph: fx.Graph) -> int:
        raise NotImplementedError


class FusionPass(GraphPass):
    """A pattern-matcher pass: subclasses register patterns on ``self.patterns`` in ``__init__``."""

    def __init__(self, config: ResolvedPassConfig | None = None):
        super().__init__(config)
        self.patterns = PatternMatcherPass(pass_name=self.flag)

    def __call__(self, graph: fx.Graph) -> int:
        count = self.patterns.apply(graph)
        graph.eliminate_dead_code()
        log.debug("%s: %d matches", self.flag, count)
        return count
