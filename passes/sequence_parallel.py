"""enable_sp: all-reduce -> (residual add +) RMSNorm (-> FP8 static quant) becomes reduce-scatter -> the same norm
on this rank's rows -> all-gather.

An all-reduce moves 2(tp-1)/tp of the tensor and leaves every rank normalising every row; a reduce-scatter and an
all-gather move the same bytes between them, but each rank normalises 1/tp of the rows, and with FP8 quant the
all-gather carries one byte per element instead of two. It also puts each GEMM next to a collective of its own
(fuse_gemm_comms then overlaps the two).

The residual stream becomes sharded: where a rewritten norm first reads a residual every rank holds whole, the
pass takes this rank's rows of it (``shard_rows``); the residual it writes back stays sharded and feeds the next
rewritten norm directly. Anything else that reads a sharded residual gets it all-gathered. The graph must hold
the whole model (vLLM's fullgraph requirement), and num_tokens must split evenly over the TP group:
``ranges.range_for`` sends other sizes to a graph compiled without this pass.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fusiontune.kernels import QUANT_SCHEMES, overload, rms_norm_quant_name

from .base import GraphPass
from .functional_calls import OpCall, as_op_call, emit_replacement, getitem, is_view_of_base, refresh_meta, result_node


def _rows(value: fx.Node, before: fx.Node):
    """Dim 0 of ``value`` as a graph value: an int, the graph's symbolic-size input for a dynamic size, or else a
    ``sym_size`` node (which reads ``value``, so it would keep a GEMM there from fusing with its collective)."""
    rows = value.meta["val"].shape[0]
    if isinstance(rows, int):
        return rows
    for node in value.graph.find_nodes(op="placeholder"):
        size = node.meta.get("val")
        if isinstance(size, torch.SymInt) and size.node.expr == rows.node.expr:
            return node
    with value.graph.inserting_before(before):
        return refresh_meta(value.graph.call_function(torch.ops.aten.sym_size.int, (value, 0)))


class SequenceParallelPass(GraphPass):
    flag = "enable_sp"

    def __init__(self, config=None):
        super().__init__(config)
        static = QUANT_SCHEMES["fp8-static"]
        self.norms = {overload(name) for name in ("rms_norm", "fused_add_rms_norm", rms_norm_quant_name(static, False),
                                                  rms_norm_quant_name(static, True))}

    def _candidate(self, call: OpCall | None) -> fx.Node | None:
        """The all-reduce feeding this norm, if the norm is one the pass rewrites."""
        if call is None or call.op not in self.norms or is_view_of_base(call, "residual"):
            return None
        reduce = call.argument("x")
        if isinstance(reduce, fx.Node) and reduce.target is overload("all_reduce") and len(reduce.users) == 1:
            return reduce
        return None

    def __call__(self, graph: fx.Graph) -> int:
        shards: dict[fx.Node, fx.Node] = {}  # a whole residual value -> this rank's rows of it
        gathers = []  # (whole residual value of an old call, its sharded replacement, rows, group)
        dead = []
        for node in list(graph.nodes):
            call = as_op_call(node)
            reduce = self._candidate(call)
            if reduce is None:
                continue
            partial, group_name = reduce.args
            rows = _rows(partial, node)
            names = [a.name for a in call.op._schema.arguments]
            arguments = {name: call.argument(name) for name in names}
            with graph.inserting_before(node):
                arguments["x"] = refresh_meta(graph.call_function(overload("reduce_scatter"), (partial, group_name)))
                if "residual" in arguments:
                    whole = arguments["residual"]
                    if whole not in shards:
                        shards[whole] = refresh_meta(graph.call_function(overload("shard_rows"), (whole, group_name)))
                    arguments["residual"] = shards[whole]
            new = refresh_meta(emit_replacement(call, call.op, arguments, ()))
            old_out = node if call.form == "plain" else result_node(node, 0)
            new_out = new if call.form == "plain" else getitem(new, 0)
            with graph.inserting_after(new_out):
                gathered = refresh_meta(graph.call_function(overload("all_gather"), (new_out, rows, group_name)))
            old_out.replace_all_uses_with(gathered)
            if call.form != "plain" and "residual" in arguments:
                old_residual = result_node(node, call.num_results)
                if old_residual is not None:
                    shards[old_residual] = getitem(new, call.num_results)
                    gathers.append((old_residual, shards[old_residual], rows, group_name))
            dead.append((node, reduce))
        for old_residual, shard, rows, group_name in gathers:  # readers of a residual that is now sharded
            if old_residual.users:
                with graph.inserting_after(shard):
                    whole = refresh_meta(graph.call_function(overload("all_gather"), (shard, rows, group_name)))
                old_residual.replace_all_uses_with(whole)
        for node, reduce in dead:
            for item in [u for u in node.users if u.target is operator.getitem]:
                graph.erase_node(item)
            graph.erase_node(node)
            graph.erase_node(reduce)
        return len(dead)
