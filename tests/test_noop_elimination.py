"""eliminate_noops on a traced graph: same-shape views and full slices go, real reshapes stay, and a norm -> quant
pair separated by them becomes fusable."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fusiontune.kernels  # noqa: F401
from fusiontune.passes.config import resolve
from fusiontune.passes.noop_elimination import NoOpEliminationPass
from fusiontune.passes.norm_quant import NormQuantFusionPass
from fusiontune.passes.platform import Platform

ops = torch.ops.fusiontune
aten = torch.ops.aten


def separated(x, w, scale):
    y = ops.rms_norm(x, w, 1e-6)
    y = y.view(x.shape[0], x.shape[1])[:, :]  # changes nothing (the full slice traces as an alias)
    y = aten.slice.Tensor(y, 1, 0, x.shape[1])  # nor does this
    q = ops.quant_fp8_static(y, scale)
    return q, x.view(-1)  # a real reshape


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_noops_are_removed_and_the_pair_then_fuses():
    args = (torch.randn(5, 64).bfloat16(), torch.randn(64).bfloat16(), torch.tensor([0.05]))
    gm = make_fx(separated, tracing_mode="fake")(*args)
    for noop in (aten.view.default, aten.alias.default, aten.slice.Tensor):
        assert noop in targets(gm)
    removed = NoOpEliminationPass()(gm.graph)
    assert removed == 3
    assert aten.slice.Tensor not in targets(gm) and aten.alias.default not in targets(gm)
    assert targets(gm).count(aten.view.default) == 1  # x.view(-1) stays
    config = resolve({"fuse_norm_quant": True}, 2, Platform())
    assert NormQuantFusionPass(config)(gm.graph) == 1
    assert ops.rms_norm_quant_fp8_static.default in targets(gm) and ops.rms_norm.default not in targets(gm)
    gm.recompile()
    got, want = gm(*args), separated(*args)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


def test_without_noop_elimination_the_pair_does_not_fuse():
    args = (torch.randn(3, 32).bfloat16(), torch.randn(32).bfloat16(), torch.tensor([0.05]))
    gm = make_fx(separated, tracing_mode="fake")(*args)
    assert NormQuantFusionPass(resolve({"fuse_norm_quant": True}, 2, Platform()))(gm.graph) == 0
