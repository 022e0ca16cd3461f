"""What every fusiontune pass is: a callable on an FX graph that returns how many times it rewrote it."""

from __future__ import annotations

import logging

from torch import fx
from torch._inductor.pattern_matcher import PatternMatcherPass

from .config import ResolvedPassConfig

log = logging.getLogger("fusiontune.passes")


class FusionPass:
    """A pattern-matcher pass: subclasses register patterns on ``self.patterns`` in ``__init__``."""

    flag: str = ""

    def __init__(self, config: ResolvedPassConfig):
        self.config = config
        self.patterns = PatternMatcherPass(pass_name=self.flag)

    def __call__(self, graph: fx.Graph) -> int:
        count = self.patterns.apply(graph)
        graph.eliminate_dead_code()
        log.debug("%s: %d matches", self.flag, count)
        return count
