"""fuse_gemm_comms (AsyncTP): after sequence parallelism, GEMM -> reduce-scatter and all-gather -> GEMM become one
op each, so the transfer of one chunk of rows overlaps the GEMM of the next.

Runs after ``enable_sp`` (which creates the collectives it looks for) and matches both GEMM forms of the model's
linear layers: ``aten.mm`` (bf16) and fusiontune's ``scaled_mm`` (FP8). An all-gathered FP8 activation is fused
only with a per-tensor scale (static quant): a per-token scale would have to be gathered too.
"""

from __future__ import annotations

import torch
from torch import fx

from fusiontune.kernels import overload

from .base import GraphPass
from .functional_calls import refresh_meta

MM = torch.ops.aten.mm.default


def _single_use(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


class GemmCommsFusionPass(GraphPass):
    flag = "fuse_gemm_comms"

    def __init__(self, config=None):
        super().__init__(config)
        self.scaled_mm = overload("scaled_mm")

    def _per_tensor(self, gemm: fx.Node) -> bool:
        _, a_scale, _, _, group_size, _ = gemm.args
        return group_size == 0 and a_scale.meta["val"].numel() == 1

    def _fused_reduce_scatter(self, scatter: fx.Node):
        gemm, group_name = scatter.args
        if not _single_use(gemm):
            return None
        if gemm.target is MM:
            return overload("matmul_reduce_scatter"), (*gemm.args, group_name), gemm
        if gemm.target is self.scaled_mm and gemm.args[4] == 0:
            return overload("scaled_mm_reduce_scatter"), (*gemm.args, group_name), gemm
        return None

    def _fused_all_gather(self, gather: fx.Node):
        shard, rows, group_name = gather.args
        if len(gather.users) != 1:
            return None
        gemm = next(iter(gather.users))
        if gemm.args[0] is not gather or gather in gemm.args[1:]:
            return None
        if gemm.target is MM:
            return overload("all_gather_matmul"), (shard, gemm.args[1], rows, group_name), gemm
        if gemm.target is self.scaled_mm and self._per_tensor(gemm):
            return overload("all_gather_scaled_mm"), (shard, *gemm.args[1:], rows, group_name), gemm
        return None

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.target is overload("reduce_scatter"):
                found, anchor = self._fused_reduce_scatter(node), node
            elif node.target is overload("all_gather"):
                found = self._fused_all_gather(node)
                anchor = found[2] if found else None
            else:
                continue
            if found is None:
                continue
            op, args, gemm = found
            with graph.inserting_before(anchor):
                fused = refresh_meta(graph.call_function(op, args))
            anchor.replace_all_uses_with(fused)
            for old in dict.fromkeys((anchor, gemm, node)):  # the collective and the GEMM it fused with
                if not old.users:
                    graph.erase_node(old)
            count += 1
        return count
