"""fuse_allreduce_rms: all-reduce -> residual add + RMSNorm (-> FP8 static quant) becomes one op.

In a TP decoder every row-parallel GEMM's partial sums are all-reduced and then added to the residual and
normalised; this pass finds ``fused_add_rms_norm`` (or, after fuse_norm_quant ran, its fused static-quant form)
whose ``x`` is an ``all_reduce`` used nowhere else, and replaces both by the all-reduce-norm op. The norm mutates
the residual, so it sits in the graph auto-functionalized; ``functional_calls`` reads and writes that form.
The pass applies only in its num_tokens range (``fi_allreduce_fusion_max_size_mb``), which ``ranges`` enforces by
compiling that range separately.
"""

from __future__ import annotations

import operator

from torch import fx

from fusiontune.kernels import QUANT_SCHEMES, overload, rms_norm_quant_name
from fusiontune.kernels.allreduce_rms import allreduce_rms_name

from .base import GraphPass
from .functional_calls import as_op_call, emit_replacement, getitem, redirect_results


class AllReduceRMSFusionPass(GraphPass):
    flag = "fuse_allreduce_rms"

    def __init__(self, config=None):
        super().__init__(config)
        norm_static = rms_norm_quant_name(QUANT_SCHEMES["fp8-static"], True)
        self.fused = {
            overload("fused_add_rms_norm"): overload(allreduce_rms_name(None)),
            overload(norm_static): overload(allreduce_rms_name("fp8-static")),
        }

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            call = as_op_call(node)
            if call is None or call.op not in self.fused:
                continue
            reduce = call.argument("x")
            if not (isinstance(reduce, fx.Node) and reduce.target is overload("all_reduce") and len(reduce.users) == 1):
                continue
            fused = self.fused[call.op]
            arguments = {a.name: call.argument(a.name) for a in call.op._schema.arguments
                         if not (a.alias_info is not None and a.alias_info.is_write)}
            arguments["x"], arguments["group_name"] = reduce.args[0], reduce.args[1]
            old_meta = node.meta.get("val")
            norm_meta = old_meta[0] if call.form != "plain" and old_meta is not None else old_meta
            new = emit_replacement(call, fused, arguments, (norm_meta,))
            redirect_results(call, new, 1)
            if call.form == "plain":
                node.replace_all_uses_with(new)
            else:
                for user in list(node.users):
                    if user.target is operator.getitem and user.args[1] == 0:
                        user.replace_all_uses_with(getitem(new, 0))
            for item in [u for u in node.users if not u.users]:  # the old call's now unread results
                graph.erase_node(item)
            for dead in (node, reduce):
                if not dead.users:
                    graph.erase_node(dead)
            count += 1
        return count
