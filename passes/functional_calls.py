"""Read and write op calls in a post-grad graph, whatever form functionalization left them in.

By the time Inductor runs its post-grad custom pass, an op that mutates an argument (``fused_add_rms_norm``
updates ``residual``) no longer appears as a call: it is wrapped as
``auto_functionalized(op, **kwargs)`` (v1) or ``auto_functionalized_v2(op, ..., _residual_base_index=i,
_all_bases=[...])`` (v2, torch's default), whose outputs are ``(*op results, *new values of the mutated
arguments)``. A pure op stays a plain call. ``OpCall`` gives the passes one view of all three, and
``emit_replacement`` writes a different op in the same form, so the passes never special-case the form.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._guards import detect_fake_mode
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

Form = Literal["plain", "v1", "v2"]
_WRAPPERS = {auto_functionalized: "v1", auto_functionalized_v2: "v2"}


@dataclass
class OpCall:
    node: fx.Node
    op: torch._ops.OpOverload
    form: Form

    @property
    def num_results(self) -> int:
        """How many outputs come before the mutated arguments' new values (a wrapped op returning nothing still
        leads with one: its ``None``)."""
        returns = len(self.op._schema.returns)
        return returns if self.form == "plain" else max(returns, 1)

    def argument(self, name: str) -> Any:
        """The value of argument ``name`` (for a mutated argument in v2 form: its base tensor)."""
        if self.form == "plain":
            for i, arg in enumerate(self.op._schema.arguments):
                if arg.name == name:
                    return self.node.args[i] if i < len(self.node.args) else self.node.kwargs[name]
            raise KeyError(name)
        if self.form == "v2" and f"_{name}_base_index" in self.node.kwargs:
            return self.node.kwargs["_all_bases"][self.node.kwargs[f"_{name}_base_index"]]
        return self.node.kwargs[name]


def as_op_call(node: Any) -> OpCall | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return OpCall(node, node.target, "plain")
    form = _WRAPPERS.get(node.target)
    if form is not None and isinstance(node.args[0], torch._ops.OpOverload):
        return OpCall(node, node.args[0], form)
    return None


def result_node(node: fx.Node, index: int) -> fx.Node | None:
    """The ``getitem(node, index)`` user of a node, if there is one."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def producer_of(value: Any) -> tuple[OpCall, int] | None:
    """If ``value`` is result ``i`` of an op call (directly, or through getitem), return (call, i)."""
    if not isinstance(value, fx.Node):
        return None
    if value.target is operator.getitem:
        call = as_op_call(value.args[0])
        return (call, value.args[1]) if call else None
    call = as_op_call(value)
    return (call, 0) if call and call.form == "plain" else None


def emit_replacement(
    old: OpCall,
    new_op: torch._ops.OpOverload,
    arguments: dict[str, Any],
    results_meta: tuple,
) -> fx.Node:
    """Insert a call of ``new_op`` in ``old``'s form just before ``old.node``; returns the new node.

    ``arguments`` maps the new op's argument names to values; mutated arguments are taken over from ``old`` (same
    names) unless ``arguments`` names them too (a mutated argument given anew must be a whole tensor, no view). ``results_meta`` are the fake values of the new op's own results; the new node's ``meta['val']`` is
    built from them plus ``old``'s mutated-argument values, so later Inductor stages see correct shapes.
    """
    graph = old.node.graph
    old_meta = old.node.meta.get("val")
    with graph.inserting_before(old.node):
        if old.form == "plain":
            schema_args = [arguments[a.name] for a in new_op._schema.arguments]
            new = graph.call_function(new_op, tuple(schema_args))
            new.meta["val"] = results_meta[0] if len(results_meta) == 1 else tuple(results_meta)
            return new
        kwargs = {k: v for k, v in old.node.kwargs.items() if old.form == "v2" and k.startswith("_")}
        for a in new_op._schema.arguments:
            mutated = a.alias_info is not None and a.alias_info.is_write
            if old.form == "v2" and mutated:  # carried in the _<name>_base_index / _all_bases entries copied above
                if a.name in arguments:
                    bases = list(kwargs["_all_bases"])
                    bases[kwargs[f"_{a.name}_base_index"]] = arguments[a.name]
                    kwargs["_all_bases"] = bases
                continue
            kwargs[a.name] = arguments[a.name] if not mutated or a.name in arguments else old.argument(a.name)
        target = auto_functionalized if old.form == "v1" else auto_functionalized_v2
        new = graph.call_function(target, (new_op,), kwargs)
        if old_meta is not None:
            new.meta["val"] = (*results_meta, *old_meta[old.num_results :])
        return new


def is_view_of_base(call: OpCall, name: str) -> bool:
    """Whether mutated argument ``name`` is a view into a larger base (v2 records its size/stride then)."""
    return call.form == "v2" and f"_{name}_size" in call.node.kwargs


def refresh_meta(node: fx.Node) -> fx.Node:
    """Set ``node.meta['val']`` by running its target on its inputs' fake values (for nodes a pass creates whose
    shapes differ from anything already in the graph)."""
    values = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    fake_mode = detect_fake_mode(pytree.tree_leaves(values))
    args, kwargs = values
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)
    return node


def getitem(node: fx.Node, index: int) -> fx.Node:
    with node.graph.inserting_after(node):
        item = node.graph.call_function(operator.getitem, (node, index))
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        item.meta["val"] = val[index]
    return item


def redirect_results(old: OpCall, new: fx.Node, new_num_results: int) -> None:
    """Point users of ``old``'s mutated-argument outputs at ``new``'s (their index moves with the result count)."""
    if old.form == "plain":
        return
    for user in list(old.node.users):
        if user.target is operator.getitem and user.args[1] >= old.num_results:
            user.replace_all_uses_with(getitem(new, user.args[1] - old.num_results + new_num_results))
