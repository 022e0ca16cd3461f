"""RoPE + KV-cache write: the fused op against RoPE followed by the cache write (reference and Triton kernel, on
poisoned outputs and caches, slots scattered over the blocks), and fuse_rope_kvcache on the compiled model.

Tolerances: the cache write copies bits, and the fused kernel rotates exactly as the rotary kernel does (same
kernel, same rounding points), so everything is compared for equality."""

from __future__ import annotations

import pytest
import torch

from fusiontune.harness.model import DecoderStack
from fusiontune.harness.presets import build_model_config
from fusiontune.kernels import kv_cache
from fusiontune.passes.config import resolve
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

triton = pytest.importorskip("triton")
from fusiontune.kernels import triton_heads  # noqa: E402
from test_triton_kernels import DEVICE, DTYPES, ON_GPU  # noqa: E402

TOKENS = [1, 7, 65, 4097] if ON_GPU else [1, 7, 65]
HEADS = [(32, 8, 128), (64, 8, 64)] if ON_GPU else [(4, 2, 64), (3, 1, 128)]
BLOCK = 16


def case(tokens, heads, kv_heads, head_dim, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g, device=DEVICE).to(dtype)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    angles = torch.rand(tokens, head_dim // 2, generator=g, device=DEVICE) * 6.28
    blocks = (2 * tokens) // BLOCK + 1  # room for twice the tokens: half the slots stay untouched
    slots = torch.randperm(blocks * BLOCK, generator=torch.Generator().manual_seed(seed))[:tokens].to(DEVICE)
    caches = [torch.full((blocks, BLOCK, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(2)]
    return q, k, v, angles.cos(), angles.sin(), caches, slots


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}")
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_equals_rope_then_cache_write(tokens, heads, is_neox):
    dtype = DTYPES[0]
    q, k, v, cos, sin, (k_cache, v_cache), slots = case(tokens, *heads, dtype, seed=tokens)
    ref_caches = [k_cache.clone(), v_cache.clone()]
    want_q, want_k = kv_cache._rotary_embedding_and_cache(q, k, v, cos, sin, is_neox, *ref_caches, slots)
    got_q, got_k = triton_heads.rotary_embedding_and_cache(q, k, v, cos, sin, is_neox, k_cache, v_cache, slots)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    for got, want in zip((k_cache, v_cache), ref_caches):  # written slots equal, the others still NaN
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    written = k_cache.view(-1, *k_cache.shape[2:])[slots]
    assert torch.equal(written, got_k) and torch.isnan(k_cache).sum() == k_cache.numel() - got_k.numel()
    # The unfused kernels: the rotary kernel, then the cache write, give the same caches.
    unfused = [torch.full_like(k_cache, float("nan")) for _ in range(2)]
    rq, rk = triton_heads.rotary_embedding(q, k, cos, sin, is_neox)
    triton_heads.reshape_and_cache(rk, v, *unfused, slots)
    assert torch.equal(rq, got_q) and torch.equal(rk, got_k)
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(unfused, (k_cache, v_cache)))


def test_separate_tensors_are_gathered_not_misread():
    q, k, v, cos, sin, caches, slots = case(9, 4, 2, 64, DTYPES[0], seed=2)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # three buffers, not one qkv row
    ref = [c.clone() for c in caches]
    want = kv_cache._rotary_embedding_and_cache(q, k, v, cos, sin, True, *ref, slots)
    got = triton_heads.rotary_embedding_and_cache(q, k, v, cos, sin, True, *caches, slots)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(caches, ref))


def compiled_outputs(model, inputs, config):
    manager = PassManager(resolve(config, level=0, platform=Platform(hidden_size=model.cfg.hidden_size)))
    torch._dynamo.reset()
    fn = torch.compile(model, dynamic=True, options={"post_grad_custom_post_pass": manager, "fx_graph_cache": False})
    outputs = []
    for x in inputs:
        for layer in model.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
        outputs.append((fn(x), [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in model.layers]))
    return outputs, manager


@pytest.mark.slow
def test_pass_fires_once_per_layer_bit_exact_with_the_same_cache():
    cfg = build_model_config("tiny", num_layers=2, max_position=512)
    model = DecoderStack(cfg, seed=5)
    inputs = [torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(cfg.torch_dtype)
              for n in (5, 17)]
    with torch.no_grad():
        want, off = compiled_outputs(model, inputs, {"fuse_rope_kvcache": False})
        got, on = compiled_outputs(model, inputs, {"fuse_rope_kvcache": True})
    for (out, caches), (ref, ref_caches) in zip(got, want):
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for pair, ref_pair in zip(caches, ref_caches) for a, b in zip(pair, ref_pair))
        assert caches[0][0].abs().sum() > 0  # the cache was written
    assert off.matches["fuse_rope_kvcache"] == 0
    assert on.graphs_seen >= 1 and on.matches["fuse_rope_kvcache"] == cfg.num_layers * on.graphs_seen


@pytest.mark.slow
def test_decode_step_attends_over_the_cache_and_both_cache_fusions_fire():
    """A decode step (3 and 9 sequences with 37 cached tokens each): RoPE + cache write and paged attention + FP8
    fuse once per layer each, and the output equals the unfused model's bit for bit."""
    cfg = build_model_config("tiny", num_layers=2, quant="fp8-static", decode_context=37, max_position=1024)
    model = DecoderStack(cfg, seed=2)
    inputs = [torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(cfg.torch_dtype)
              for n in (3, 9)]
    model.calibrate_static_scales(inputs[1])
    flags = ("fuse_rope_kvcache", "fuse_attn_quant")
    with torch.no_grad():
        want, _ = compiled_outputs(model, inputs, dict.fromkeys(flags, False))
        got, on = compiled_outputs(model, inputs, dict.fromkeys(flags, True))
    for (out, _), (ref, _) in zip(got, want):
        assert torch.equal(out, ref)
    assert on.graphs_seen >= 1
    assert all(on.matches[flag] == cfg.num_layers * on.graphs_seen for flag in flags)


def test_a_decode_batch_that_does_not_fit_the_cache_names_the_fix():
    cfg = build_model_config("tiny", decode_context=100, max_position=1024)  # 7 blocks of 16 per sequence
    assert cfg.blocks_per_sequence() == 7 and cfg.cache_problem(9) is None
    assert "raise model.max_position" in cfg.cache_problem(10)
    assert build_model_config("tiny", max_position=64).cache_problem(65).startswith("num_tokens=65 exceeds")
