"""fuse_norm_quant and fuse_act_quant on compiled graphs: how often each pattern matches, and that the fused graph
computes bit for bit what the unfused one does. One compile per config, shared by the tests (compiling is the
suite's main cost on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import fusiontune.kernels  # noqa: F401
from fusiontune.passes.config import resolve
from fusiontune.passes.functional_calls import as_op_call
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

ops = torch.ops.fusiontune
EPS = 1e-6
HIDDEN = 2880  # gpt-oss: not a multiple of 128, so per-group uses 64


def chain(x, residual, w, scale):
    """Every unfused (add +) norm -> quant and act -> quant pair, plus two that must not fuse."""
    out = []
    y = ops.rms_norm(x, w, EPS)
    out.append(ops.quant_fp8_static(y, scale))
    out.extend(ops.quant_fp8_per_token(ops.rms_norm(x * 2, w, EPS)))
    out.extend(ops.quant_fp8_per_group(ops.rms_norm(x * 3, w, EPS), 64))
    r1, r2, r3 = residual.clone(), residual.clone(), residual.clone()
    out.append(ops.quant_fp8_static(ops.fused_add_rms_norm(x, r1, w, EPS), scale))
    out.extend(ops.quant_fp8_per_token(ops.fused_add_rms_norm(x, r2, w, EPS)))
    out.extend(ops.quant_fp8_per_group(ops.fused_add_rms_norm(x, r3, w, EPS), 64))
    out += [r1, r2, r3]
    gate_up = torch.cat([x, x * 0.5], dim=-1)
    out.append(ops.quant_fp8_static(ops.silu_and_mul(gate_up), scale))
    out.extend(ops.quant_fp8_per_group(ops.silu_and_mul(gate_up * 2), 64))
    # Negative cases: the norm output has a second user, so it must stay materialised.
    shared = ops.rms_norm(x * 4, w, EPS)
    out += [ops.quant_fp8_static(shared, scale), shared]
    # Negative: per-token quant after the activation is not a fusion the reference page lists.
    out.extend(ops.quant_fp8_per_token(ops.silu_and_mul(gate_up * 3)))
    return out


EXPECTED = {"fuse_norm_quant": 6, "fuse_act_quant": 2}


class RecordingPassManager(PassManager):
    """Keeps the fusiontune ops of the last graph it rewrote (plain calls and auto-functionalized ones)."""

    def __call__(self, graph):
        self.forms = {c.form for c in map(as_op_call, graph.nodes) if c is not None and c.form != "plain"}
        super().__call__(graph)
        self.op_names = []
        for node in graph.nodes:
            call = as_op_call(node)
            if call is not None and call.op.namespace == "fusiontune":
                self.op_names.append(call.op._opname)


def compile_chain(flags: dict[str, bool], **inductor_options):
    config = resolve(flags, level=2, platform=Platform(hidden_size=HIDDEN))
    manager = RecordingPassManager(config)
    torch._dynamo.reset()
    compiled = torch.compile(
        chain, fullgraph=True, dynamic=True, options={"post_grad_custom_post_pass": manager, "fx_graph_cache": False, **inductor_options},
    )
    return compiled, manager


@pytest.fixture(scope="module")
def fused():
    """The chain compiled with both fusions, and run once: torch.compile compiles on the first call, so the pass
    manager has seen the graph whichever test asks first (under xdist, a test may run without the others)."""
    compiled, manager = compile_chain({"fuse_norm_quant": True, "fuse_act_quant": True})
    compiled(*inputs(7, seed=7))
    return compiled, manager


def inputs(num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    residual = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(torch.bfloat16)
    return x, residual, w, torch.tensor([0.02])


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("num_tokens", [7, 33])
def test_fused_graph_matches_each_pattern_and_is_bit_exact(fused, num_tokens):
    compiled, manager = fused
    args = inputs(num_tokens, seed=num_tokens)
    got = compiled(*args)
    want = chain(*args)
    assert manager.matches["fuse_norm_quant"] == EXPECTED["fuse_norm_quant"] * manager.graphs_seen
    assert manager.matches["fuse_act_quant"] == EXPECTED["fuse_act_quant"] * manager.graphs_seen
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert torch.equal(as_bits(g), as_bits(w)), f"output {i} differs"


def test_rewritten_graph_calls_fused_ops_and_keeps_the_negatives(fused):
    _, manager = fused
    assert manager.forms == {"v2"}  # torch's default functionalization of the mutating norms
    ops_in_graph = manager.op_names
    for name in (
        "rms_norm_quant_fp8_static",
        "rms_norm_quant_fp8_per_token",
        "rms_norm_quant_fp8_per_group",
        "fused_add_rms_norm_quant_fp8_static",
        "fused_add_rms_norm_quant_fp8_per_token",
        "fused_add_rms_norm_quant_fp8_per_group",
        "silu_and_mul_quant_fp8_static",
        "silu_and_mul_quant_fp8_per_group",
    ):
        assert ops_in_graph.count(name) == 1, name
    # Left unfused: the norm with two users, and silu_and_mul -> per-token quant.
    assert ops_in_graph.count("rms_norm") == 1
    assert ops_in_graph.count("quant_fp8_static") == 1
    assert ops_in_graph.count("silu_and_mul") == 1 and ops_in_graph.count("quant_fp8_per_token") == 1
    assert "fused_add_rms_norm" not in ops_in_graph and "quant_fp8_per_group" not in ops_in_graph


def test_disabled_passes_match_nothing_and_change_the_cache_key(fused):
    _, on = fused
    compiled, off = compile_chain({"fuse_norm_quant": False, "fuse_act_quant": False})
    compiled(*inputs(5, seed=3))
    assert off.matches["fuse_norm_quant"] == 0 and off.matches["fuse_act_quant"] == 0
    assert off.graphs_seen >= 1
    assert off.uuid() != on.uuid()


def test_v1_auto_functionalization_is_matched_too():
    """With auto_functionalized (v1) instead of v2, the residual variants still fuse and stay bit exact."""
    compiled, manager = compile_chain({"fuse_norm_quant": True, "fuse_act_quant": True},
                                      enable_auto_functionalized_v2=False)
    args = inputs(11, seed=5)
    got, want = compiled(*args), chain(*args)
    assert manager.forms == {"v1"}
    assert manager.matches["fuse_norm_quant"] == EXPECTED["fuse_norm_quant"] * manager.graphs_seen
    assert all(torch.equal(as_bits(g), as_bits(w)) for g, w in zip(got, want))
