"""The paged KV cache write, and RoPE fused with it (fuse_rope_kvcache).

A layer's cache is ``[num_blocks, block_size, kv_heads, head_dim]`` for keys and the same for values;
``slot_mapping[t]`` is the slot (block * block_size + offset) token t's key and value go to.
``reshape_and_cache(k, v, k_cache!, v_cache!, slot_mapping)`` writes them (after RoPE, unfused), and
``rotary_embedding_and_cache(q, k, v, cos, sin, is_neox, k_cache!, v_cache!, slot_mapping)`` rotates q and k and
writes the rotated k and v into the cache in the same pass, returning the rotated q and k for attention: the
rotated keys are not read back from memory to be cached.
"""

from __future__ import annotations

import torch

from . import numerics
from .library import define_op


def write_slots(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    cache.view(-1, *cache.shape[2:])[slot_mapping] = values


def _reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    write_slots(k_cache, k, slot_mapping)
    write_slots(v_cache, v, slot_mapping)


def _rotary_embedding_and_cache(q, k, v, cos, sin, is_neox, k_cache, v_cache, slot_mapping):
    q_rot, k_rot = numerics.rope(q, cos, sin, is_neox), numerics.rope(k, cos, sin, is_neox)
    _reshape_and_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot


reshape_and_cache = define_op(
    "reshape_and_cache",
    "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    _reshape_and_cache, lambda *args: None, category="kv cache",
    mutates_args=("k_cache", "v_cache"))
rotary_embedding_and_cache = define_op(
    "rotary_embedding_and_cache",
    "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, bool is_neox, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping) -> (Tensor, Tensor)",
    _rotary_embedding_and_cache, lambda q, k, *rest: (torch.empty_like(q), torch.empty_like(k)),
    category="fused rope+kv cache", mutates_args=("k_cache", "v_cache"))
