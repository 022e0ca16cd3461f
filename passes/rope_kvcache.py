"""fuse_rope_kvcache: rotary_embedding -> reshape_and_cache (the rotated K and V into the paged KV cache) becomes
``rotary_embedding_and_cache``, which writes the cache while it rotates.

A match is a cache write whose ``k`` is the rotated K of a rotary_embedding call. The fused op takes the rotary's
inputs, the cache write's V, caches and slot mapping, and returns the rotated Q and K for attention. It goes where
the cache write was, so every reader of the rotated Q and K must come after that point (in the model, attention
does). The pass runs before the Q/K-norm + RoPE fusion (``fusions.PASSES`` order): with both on, this one takes the
rotary and the Q/K-norm pass finds nothing, which its match count says.
"""

from __future__ import annotations

import operator

from torch import fx

from fusiontune.kernels import overload

from .base import GraphPass
from .functional_calls import as_op_call, emit_replacement, getitem, redirect_results, result_node


class RopeKVCacheFusionPass(GraphPass):
    flag = "fuse_rope_kvcache"

    def __init__(self, config=None):
        super().__init__(config)

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        rotary, fused_op = overload("rotary_embedding"), overload("rotary_embedding_and_cache")
        order = {n: i for i, n in enumerate(graph.nodes)}  # of the nodes the pass starts from; it compares only those
        for node in list(graph.nodes):
            call = as_op_call(node)
            if call is None or call.op is not overload("reshape_and_cache"):
                continue
            k = call.argument("k")
            if not (isinstance(k, fx.Node) and k.target is operator.getitem and k.args[1] == 1
                    and k.args[0].target is rotary):
                continue
            rope = k.args[0]
            readers = [u for item in rope.users for u in item.users if u is not node]
            if any(order[u] < order[node] for u in readers):
                continue
            q, k_in, cos, sin, is_neox = rope.args
            arguments = {"q": q, "k": k_in, "v": call.argument("v"), "cos": cos, "sin": sin, "is_neox": is_neox,
                         "slot_mapping": call.argument("slot_mapping")}
            meta = rope.meta.get("val")
            new = emit_replacement(call, fused_op, arguments, tuple(meta) if meta is not None else (None, None))
            redirect_results(call, new, 2)
            for index in (0, 1):
                old = result_node(rope, index)
                if old is not None:
                    old.replace_all_uses_with(getitem(new, index))
            for dead in [*rope.users, rope, *[u for u in node.users if not u.users], node]:
                if not dead.users:
                    graph.erase_node(dead)
            count += 1
        return count
