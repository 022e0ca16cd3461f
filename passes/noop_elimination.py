"""eliminate_noops: drop aliases, and views, reshapes and slices whose output is their input, so fusion patterns
see adjacent ops (``rms_norm -> view(same shape) -> quant`` would otherwise not match)."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import GraphPass

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor) or va.dim() != vb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _is_full_slice(node: fx.Node) -> bool:
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return step == 1 and start in (None, 0) and _same_shape(src, node) and isinstance(dim, int)


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is aten.alias.default:
        return True
    if node.target in _RESHAPES:
        return _same_shape(node.args[0], node)
    return node.target is aten.slice.Tensor and _is_full_slice(node)


class NoOpEliminationPass(GraphPass):
    flag = "eliminate_noops"

    def __init__(self, config=None):
        super().__init__(config)

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if _is_noop(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                count += 1
        return count
