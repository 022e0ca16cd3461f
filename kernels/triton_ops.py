"""CUDA implementations: every norm / activation / quant op, unfused and fused, dispatches to the one Triton row
kernel on CUDA tensors, the rotary embedding ops to the per-head kernel, the fused all-reduce + norm ops to the
symmetric-memory kernel, and the unfused attention to the faster of cuDNN's (through SDPA) and ours (the reference
stays the CPU implementation)."""

from __future__ import annotations

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from . import flashinfer_allreduce, implementations, symm_mem, triton_attention, triton_heads
from .act_quant import ACT_QUANT_SCHEMES, act_quant_name
from .attention import (OUR_KERNEL, SDPA_KERNEL, SDPA_THEN_QUANT, causal_attention, fused_quant_attention_kernel,
                        unfused_attention_kernel)
from .allreduce_rms import ALLREDUCE_RMS_QUANTS, allreduce_rms_name
from .collectives import all_reduced, all_reduced_cuda, group_size
from .library import NAMESPACE
from .norm_quant import rms_norm_quant_name
from .quant import QUANT_SCHEMES, QuantScheme
from .triton_allreduce_rms import allreduce_add_rms_norm
from .triton_rows import INPUT_ADD_RESIDUAL, INPUT_PLAIN, INPUT_SILU_MUL, run_rows


def _quant_kwargs(scheme: QuantScheme, extras) -> dict:
    if scheme.name == "fp8-static":
        return {"quant": scheme.name, "scale": extras[0]}
    if scheme.name == "fp8-per-group":
        return {"quant": scheme.name, "group_size": extras[0]}
    return {"quant": scheme.name}


def _allreduce_rms(x, residual, weight, eps, *rest, quant: str | None):
    """The fused all-reduce + add + norm (+ quant): fusiontune's kernel (one-shot or two-shot) or FlashInfer's where
    ``symm_mem.fused_method`` takes it, else an all-reduce (NCCL's with ``allreduce_backend: nccl``, the size's
    best otherwise) and then the fused add + norm kernel."""
    scale, group_name = (rest[0] if quant else None), rest[-1]
    method = symm_mem.fused_method(x.numel() * x.element_size(), group_size(group_name), quant is not None)
    if method == "flashinfer":
        symm_mem.record("flashinfer")
        return flashinfer_allreduce.allreduce_add_rms_norm(x, residual, weight, eps, scale, group_name)
    if method != "unfused":
        symm_mem.record(f"fusiontune {method}")
        return allreduce_add_rms_norm(x, residual, weight, eps, scale, group_name, two_shot=method == "two-shot")
    reduce = all_reduced if symm_mem.SETTINGS.allreduce_backend == "nccl" else all_reduced_cuda
    symm_mem.record("all-reduce, then the norm kernel")
    return run_rows(reduce(x, group_name), input_mode=INPUT_ADD_RESIDUAL, residual=residual, weight=weight, eps=eps,
                    **({"quant": quant, "scale": scale} if quant else {}))


SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cudnn_attention(q, k, v, scale):
    """The causal attention through SDPA, cuDNN's backend first (then flash, memory-efficient, math)."""
    with sdpa_kernel(SDPA_ORDER, set_priority=True):
        return causal_attention(q, k, v, scale)


def _attention(q, k, v, scale):
    """The unfused causal attention a serving engine would run here: the faster of cuDNN's and ours for the size
    (``attention.unfused_attention_kernel``), recorded (``implementations.ATTENTION``) so that every row says which
    ran."""
    kernel = unfused_attention_kernel(q.shape[0])
    implementations.record(implementations.ATTENTION, kernel)
    if kernel == SDPA_KERNEL:
        return cudnn_attention(q, k, v, scale)
    return triton_attention.attention(q, k, v, scale)


def _attention_quant(q, k, v, scale, quant_scale):
    """The fused attention + FP8 quant: our fused kernel where it is the faster, else cuDNN's attention and then
    the quant kernel (``attention.fused_quant_attention_kernel``), recorded."""
    kernel = fused_quant_attention_kernel(q.shape[0])
    implementations.record(implementations.ATTENTION, kernel)
    if kernel == SDPA_THEN_QUANT:
        return run_rows(cudnn_attention(q, k, v, scale), quant="fp8-static", scale=quant_scale)
    return triton_attention.attention_quant_fp8_static(q, k, v, scale, quant_scale)


def _recorded(kernel, implementation: str):
    def run(*args):
        implementations.record(implementations.ATTENTION, implementation)
        return kernel(*args)
    return run


def _register(name: str, kernel) -> None:
    torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda", kernel)


def _register_all() -> None:
    _register("rms_norm", lambda x, weight, eps: run_rows(x, weight=weight, eps=eps))
    _register("fused_add_rms_norm", lambda x, residual, weight, eps: run_rows(
        x, input_mode=INPUT_ADD_RESIDUAL, residual=residual, weight=weight, eps=eps))
    _register("silu_and_mul", lambda x: run_rows(x, input_mode=INPUT_SILU_MUL))
    _register("fused_add_rms_norm_pad", lambda x, residual, weight, eps, padded_hidden: run_rows(
        x, input_mode=INPUT_ADD_RESIDUAL, residual=residual, weight=weight, eps=eps, pad_to=padded_hidden))
    for scheme in QUANT_SCHEMES.values():
        _register(scheme.op_name, lambda x, *extras, s=scheme: run_rows(x, **_quant_kwargs(s, extras)))
        _register(rms_norm_quant_name(scheme, False), lambda x, weight, eps, *extras, s=scheme: run_rows(
            x, input_mode=INPUT_PLAIN, weight=weight, eps=eps, **_quant_kwargs(s, extras)))
        _register(rms_norm_quant_name(scheme, True), lambda x, residual, weight, eps, *extras, s=scheme: run_rows(
            x, input_mode=INPUT_ADD_RESIDUAL, residual=residual, weight=weight, eps=eps, **_quant_kwargs(s, extras)))
    for quant in ALLREDUCE_RMS_QUANTS:
        _register(allreduce_rms_name(quant), lambda *args, q=quant: _allreduce_rms(*args, quant=q))
    _register("rotary_embedding", triton_heads.rotary_embedding)
    _register("qk_norm_rope", triton_heads.qk_norm_rope)
    _register("reshape_and_cache", triton_heads.reshape_and_cache)
    _register("rotary_embedding_and_cache", triton_heads.rotary_embedding_and_cache)
    _register("attention", _attention)
    _register("attention_quant_fp8_static", _attention_quant)
    _register("paged_attention", _recorded(triton_attention.paged_attention, f"{OUR_KERNEL} (paged decode)"))
    _register("paged_attention_quant_fp8_static", _recorded(triton_attention.paged_attention_quant_fp8_static,
                                                            f"{OUR_KERNEL} (paged decode, fused with the quant)"))
    for scheme in ACT_QUANT_SCHEMES:
        _register(act_quant_name(scheme), lambda x, *extras, s=scheme: run_rows(
            x, input_mode=INPUT_SILU_MUL, **_quant_kwargs(s, extras)))


_register_all()
