"""The rewrite the quant and padding fusions share: "producer op -> consumer op" becomes one fused op.

A match is a consumer node (a quant op of one scheme, or a zero-padding) whose input is result 0 of a producer op
call (any functionalized form) and has no other user. The fused op takes the producer's arguments followed by the
consumer's extra arguments (for a quant: its own; for other consumers, what ``extras_of`` derives); its results
replace the consumer's, and the producer's mutated arguments (the residual) keep flowing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, register_graph_pattern

from fusiontune.kernels.quant import QuantScheme

from .functional_calls import OpCall, emit_replacement, getitem, producer_of, redirect_results


def quant_pattern(scheme: QuantScheme) -> CallFunction:
    extras = [Arg() for _ in range(scheme.num_extras)]
    return CallFunction(scheme.overload(), Arg(), *extras)


def register_quant_fusion(
    patterns,
    scheme: QuantScheme,
    fused_for: Callable[[torch._ops.OpOverload], torch._ops.OpOverload | None],
) -> None:
    """Register on ``patterns``: quant(<producer>(...)) -> fused_for(producer)(..., *quant extras)."""
    register_consumer_fusion(patterns, quant_pattern(scheme), fused_for, lambda node: list(node.args[1:]))


def register_consumer_fusion(
    patterns,
    pattern: CallFunction,
    fused_for: Callable[[torch._ops.OpOverload], torch._ops.OpOverload | None],
    extras_of: Callable[[fx.Node], list | None],
) -> None:
    """Register on ``patterns``: consumer(<producer>(...)) -> fused_for(producer)(..., *extras_of(consumer)).
    ``extras_of`` returns None where this consumer node cannot fuse (say, a padding on the wrong side)."""

    def find_producer(quant_node: fx.Node) -> tuple[OpCall, fx.Node] | None:
        if extras_of(quant_node) is None:
            return None
        source = quant_node.args[0]
        found = producer_of(source)
        if found is None or found[1] != 0 or len(source.users) != 1:
            return None
        call = found[0]
        fused = fused_for(call.op)
        if fused is None:
            return None
        # The fused op is inserted at the producer: the quant's extra inputs must already exist there.
        order = {n: i for i, n in enumerate(quant_node.graph.nodes)}
        extras = [a for a in extras_of(quant_node) if isinstance(a, fx.Node)]
        if any(order[a] > order[call.node] for a in extras):
            return None
        return call, source

    def check(match: Match) -> bool:
        return find_producer(match.output_node()) is not None

    def rewrite(match: Match, *_args, **_kwargs) -> None:
        quant_node = match.output_node()
        call, source = find_producer(quant_node)
        fused = fused_for(call.op)
        names = [a.name for a in fused._schema.arguments]
        n_producer_args = len(call.op._schema.arguments)
        arguments = {name: call.argument(name) for name in names[:n_producer_args]}
        arguments.update(zip(names[n_producer_args:], extras_of(quant_node)))
        quant_val = quant_node.meta.get("val")
        results_meta = tuple(quant_val) if isinstance(quant_val, (tuple, list)) else (quant_val,)
        new = emit_replacement(call, fused, arguments, results_meta)
        n_results = len(fused._schema.returns)
        redirect_results(call, new, n_results)
        if call.form == "plain":
            quant_node.replace_all_uses_with(new)
        elif n_results == 1:
            quant_node.replace_all_uses_with(getitem(new, 0))
        else:
            for user in list(quant_node.users):
                user.replace_all_uses_with(getitem(new, user.args[1]))
        graph = quant_node.graph
        for node in (quant_node, source, call.node):
            if node in graph.nodes and not node.users:
                graph.erase_node(node)

    register_graph_pattern(pattern, extra_check=check, pass_dict=patterns)(rewrite)
