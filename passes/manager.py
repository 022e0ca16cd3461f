"""The one pass manager: installed as Inductor's ``post_grad_custom_post_pass``, it runs every enabled pass in the
order ``fusions.PASSES`` declares and counts matches per pass.

Inductor folds ``uuid()`` into its cache key. Ours hashes the resolved config and the source of every pass module,
so a graph compiled under other passes (or an older version of a pass) is never served from the cache.

Every fusiontune op is registered with Inductor as an explicit fallback (``register_fallbacks``) before the first
compile. Without that, Inductor creates an implicit fallback at the op's first use and logs the op with its inputs;
torch 2.11 formats that line eagerly, stringifying each input's whole IR provenance, and for an op at the end of a
large graph (the final all-reduce + norm of an 8-layer Llama-3.1-8B shape) that ran for minutes before it was
killed (2 and 4 x H200, 2026-11-28; the stack dump showed ``ir.py __str__`` nested to the graph's depth). torch
2.13 formats it lazily. vLLM patches the same path for its own ops.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from fusiontune.kernels.library import OP_CATEGORY, overload

from .act_padding import ActPaddingFusionPass
from .act_quant import ActQuantFusionPass
from .allreduce_rms import AllReduceRMSFusionPass
from .attn_quant import AttnQuantFusionPass
from .base import GraphPass
from .config import ResolvedPassConfig
from .fusions import PASSES, PassSpec
from .gemm_comms import GemmCommsFusionPass
from .noop_elimination import NoOpEliminationPass
from .norm_quant import NormQuantFusionPass
from .qk_norm_rope import QKNormRopeFusionPass
from .rope_kvcache import RopeKVCacheFusionPass
from .sequence_parallel import SequenceParallelPass

_PASSES_DIR = Path(__file__).parent
_KERNELS_DIR = _PASSES_DIR.parent / "kernels"


# Each PassConfig flag's pass (its entry in fusions.PASSES says what it fuses, when and with which thresholds).
PASS_CLASSES: dict[str, type[GraphPass]] = {cls.flag: cls for cls in (
    NoOpEliminationPass, NormQuantFusionPass, ActQuantFusionPass, AttnQuantFusionPass, QKNormRopeFusionPass,
    RopeKVCacheFusionPass, SequenceParallelPass, GemmCommsFusionPass, AllReduceRMSFusionPass, ActPaddingFusionPass)}


def load_pass(spec: PassSpec, config: ResolvedPassConfig) -> GraphPass:
    return PASS_CLASSES[spec.flag](config)


def _source_hash() -> str:
    digest = hashlib.sha256()
    for directory in (_PASSES_DIR, _KERNELS_DIR):
        for path in sorted(directory.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


_FALLBACKS_REGISTERED = False


def register_fallbacks() -> None:
    """Every fusiontune op as an explicit Inductor fallback, with the layout constraint the implicit fallback would
    give it (see the module doc), once per process."""
    global _FALLBACKS_REGISTERED
    if _FALLBACKS_REGISTERED:
        return
    from torch._inductor import lowering

    for name in OP_CATEGORY:
        op = overload(name)
        if op in lowering.lowerings:
            continue
        constraint = None
        if hasattr(lowering, "get_layout_constraint_tag") and hasattr(lowering, "tag_to_layout_constraint"):
            constraint = lowering.tag_to_layout_constraint(lowering.get_layout_constraint_tag(op, with_default=True))
        lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    _FALLBACKS_REGISTERED = True


class PassManager(CustomGraphPass):
    def __init__(self, config: ResolvedPassConfig):
        register_fallbacks()
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
