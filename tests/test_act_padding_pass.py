"""fuse_act_padding on compiled graphs: the gpt-oss shape (hidden 2880 padded to 3072 before the MLP) fuses once
per layer, the output is bit-identical to the model compiled without the pass, and the pass leaves alone what is
not a right-side zero padding of a fused add + norm."""

from __future__ import annotations

import pytest

import torch

import fusiontune.kernels  # noqa: F401
from fusiontune.harness.model import DecoderStack
from fusiontune.harness.presets import build_model_config
from fusiontune.passes.config import resolve
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

ops = torch.ops.fusiontune
FLAG = "fuse_act_padding"


def compiled(fn, on: bool, dynamic: bool = True):
    manager = PassManager(resolve({FLAG: on}, level=0, platform=Platform(hidden_size=2880)))
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=dynamic, options={"post_grad_custom_post_pass": manager,
                                                    "fx_graph_cache": False}), manager


@pytest.mark.slow
def test_gpt_oss_shape_fuses_once_per_layer_bit_exact():
    cfg = build_model_config("gpt-oss-20b", num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    assert cfg.mlp_input_size == 3072
    model = DecoderStack(cfg, seed=1)
    inputs = [torch.randn(n, 2880, generator=torch.Generator().manual_seed(n)).to(cfg.torch_dtype) for n in (3, 17)]
    with torch.no_grad():
        unfused, _ = compiled(model, on=False)
        want = [unfused(x) for x in inputs]
        fused, manager = compiled(model, on=True)
        got = [fused(x) for x in inputs]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert manager.graphs_seen >= 1 and manager.matches[FLAG] == cfg.num_layers * manager.graphs_seen


def paddings(x, r1, r2, r3, w):
    right = torch.nn.functional.pad(ops.fused_add_rms_norm(x, r1, w, 1e-6), (0, 64))
    left = torch.nn.functional.pad(ops.fused_add_rms_norm(x, r2, w, 1e-6), (64, 0))  # not a right-side padding
    shared = ops.fused_add_rms_norm(x, r3, w, 1e-6)  # the unpadded norm is used too
    return right, left, torch.nn.functional.pad(shared, (0, 64)), shared, r1, r2, r3


def test_only_right_side_zero_padding_of_a_sole_use_fuses():
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 256, generator=g), torch.randn(5, 256, generator=g), torch.rand(256, generator=g) + 0.5
    fn, manager = compiled(paddings, on=True, dynamic=False)  # a model's hidden size is static (its weights')
    got, want = fn(x, r.clone(), r.clone(), r.clone(), w), paddings(x, r.clone(), r.clone(), r.clone(), w)
    assert manager.matches[FLAG] == 1 * manager.graphs_seen
    assert all(torch.equal(a, b) for a, b in zip(got, want))
