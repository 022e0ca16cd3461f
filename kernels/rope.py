"""Rotary embedding of Q and K, and the fused Q/K-norm + RoPE that enable_qk_norm_rope_fusion swaps in for it.

``rotary_embedding(q, k, cos, sin, is_neox)`` rotates q [T, heads, head_dim] and k [T, kv_heads, head_dim] (one
op for both, as vLLM's is), neox or gptj style. Models with per-head Q/K RMSNorm (Qwen3) run, unfused:
split qkv -> rms_norm(q per head) -> rms_norm(k per head) -> rotary_embedding; the fused op
``qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, head_dim, is_neox)`` reads q and k
straight out of the qkv projection and writes them normed and rotated, one read and one write per element.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def _rotary_embedding(q, k, cos, sin, is_neox):
    return numerics.rope(q, cos, sin, is_neox), numerics.rope(k, cos, sin, is_neox)


def _rotary_embedding_fake(q, k, cos, sin, is_neox):
    return torch.empty_like(q), torch.empty_like(k)


rotary_embedding = define_op(
    "rotary_embedding",
    "(Tensor q, Tensor k, Tensor cos, Tensor sin, bool is_neox) -> (Tensor, Tensor)",
    _rotary_embedding,
    _rotary_embedding_fake,
    category="rope",
)


def split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim], views of the qkv projection [T, ...]."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].unflatten(-1, (num_heads, head_dim))
    k = qkv[:, q_size:q_size + kv_size].unflatten(-1, (num_kv_heads, head_dim))
    return q, k


def _qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, head_dim, is_neox):
    q, k = split_heads(qkv, num_heads, num_kv_heads, head_dim)
    q = numerics.rms_norm(q, q_weight, eps)
    k = numerics.rms_norm(k, k_weight, eps)
    return numerics.rope(q, cos, sin, is_neox), numerics.rope(k, cos, sin, is_neox)


def _qk_norm_rope_fake(qkv, q_weight, k_weight, cos, sin, eps, num_heads, num_kv_heads, head_dim, is_neox):
    tokens = qkv.shape[0]
    return qkv.new_empty((tokens, num_heads, head_dim)), qkv.new_empty((tokens, num_kv_heads, head_dim))


qk_norm_rope = define_op(
    "qk_norm_rope",
    "(Tensor qkv, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps, int num_heads, "
    "int num_kv_heads, int head_dim, bool is_neox) -> (Tensor, Tensor)",
    _qk_norm_rope,
    _qk_norm_rope_fake,
    category="fused qk-norm+rope",
)
