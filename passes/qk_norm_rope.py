"""enable_qk_norm_rope_fusion: split qkv -> per-head RMSNorm of Q and K -> rotary embedding becomes one op.

The match is anchored at ``rotary_embedding(q, k, cos, sin, is_neox)``. Walking back from q and k through the
reshapes and copies that head-splitting leaves in the graph, each must come from an ``rms_norm`` used only there,
whose input in turn is the Q (resp. K) part of one qkv projection: the split's first and second pieces, or slices
starting at 0 and at the Q width. Then ``qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps, ...)`` takes the
rotary op's place; the norms and the copies before them are left without users and removed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, register_graph_pattern

from fusiontune.kernels import overload

from .base import FusionPass

aten = torch.ops.aten
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                 aten.alias.default}


def _through_copies(value):
    while isinstance(value, fx.Node) and value.op == "call_function" and value.target in _PASS_THROUGH:
        value = value.args[0]
    return value


def _sole_norm_behind(value) -> fx.Node | None:
    """The rms_norm that ``value`` is a reshaped copy of, if every node from the norm to ``value`` has one user
    (the fused op will not materialise the normed tensor, so nothing else may read it)."""
    node = value
    while isinstance(node, fx.Node) and node.op == "call_function" and len(node.users) == 1:
        if node.target is overload("rms_norm"):
            return node
        if node.target not in _PASS_THROUGH:
            return None
        node = node.args[0]
    return None


def _last_dim(node: fx.Node, dim) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)


def _piece_of(value) -> tuple[fx.Node, int, int] | None:
    """(qkv, first column, width) if ``value`` is a column range of a 2-D tensor: a split piece or a slice."""
    node = _through_copies(value)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem and getattr(node.args[0], "target", None) is aten.split_with_sizes.default:
        split = node.args[0]
        source, sizes = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else 0
        if not _last_dim(source, dim) or not all(isinstance(s, int) for s in sizes):
            return None
        index = node.args[1]
        return source, sum(sizes[:index]), sizes[index]
    if node.target is aten.slice.Tensor and len(node.args) >= 4:
        source, dim, start, end = node.args[:4]
        step = node.args[4] if len(node.args) > 4 else 1
        if _last_dim(source, dim) and step == 1 and isinstance(start, int) and isinstance(end, int):
            return source, start, end - start
    return None


@dataclass
class QKNormRope:
    qkv: fx.Node
    q_norm: fx.Node
    k_norm: fx.Node
    num_heads: int
    num_kv_heads: int
    head_dim: int


def find(rope: fx.Node) -> QKNormRope | None:
    q, k = rope.args[0], rope.args[1]
    norms = [_sole_norm_behind(v) for v in (q, k)]
    if None in norms:
        return None
    q_norm, k_norm = norms
    if q_norm.args[2] != k_norm.args[2]:  # one eps for both
        return None
    pieces = [_piece_of(n.args[0]) for n in norms]
    if None in pieces:
        return None
    (qkv, q_start, q_width), (qkv_k, k_start, k_width) = pieces
    q_val, k_val, qkv_val = q.meta.get("val"), k.meta.get("val"), qkv.meta.get("val")
    if qkv is not qkv_k or q_start != 0 or k_start != q_width or qkv_val is None or qkv_val.dim() != 2:
        return None
    head_dim = q_val.shape[-1]
    if not isinstance(head_dim, int) or q_width % head_dim or k_width % head_dim or k_val.shape[-1] != head_dim:
        return None
    # k_start == q_width above: the fused op reads the K heads right after the Q heads of each qkv row.
    return QKNormRope(qkv, q_norm, k_norm, q_width // head_dim, k_width // head_dim, head_dim)


class QKNormRopeFusionPass(FusionPass):
    flag = "enable_qk_norm_rope_fusion"

    def __init__(self, config):
        super().__init__(config)
        pattern = CallFunction(overload("rotary_embedding"), Arg(), Arg(), Arg(), Arg(), Arg())

        def check(match: Match) -> bool:
            return find(match.output_node()) is not None

        def rewrite(match: Match, *_args, **_kwargs) -> None:
            rope = match.output_node()
            found = find(rope)
            _, _, cos, sin, is_neox = rope.args
            graph = rope.graph
            with graph.inserting_before(rope):
                fused = graph.call_function(overload("qk_norm_rope"), (
                    found.qkv, found.q_norm.args[1], found.k_norm.args[1], cos, sin, found.q_norm.args[2],
                    found.num_heads, found.num_kv_heads, found.head_dim, is_neox))
            fused.meta["val"] = rope.meta.get("val")
            rope.replace_all_uses_with(fused)  # its users are getitem 0 (q) and 1 (k): the same for the fused op
            graph.erase_node(rope)

        register_graph_pattern(pattern, extra_check=check, pass_dict=self.patterns)(rewrite)
