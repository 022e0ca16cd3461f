"""FlashInfer's fused all-reduce + residual add + RMSNorm (+ FP8 static quant): the kernel vLLM runs for
``fuse_allreduce_rms`` (TensorRT-LLM's, through ``flashinfer.comm.allreduce_fusion``). It is a peer of ours in
``bench-kernels --tp`` and the fused op's implementation under ``collectives.allreduce_backend: flashinfer``.

Why a module of its own: flashinfer-python is optional (a 62 MB wheel that compiles its communication kernels with
nvcc at first use), so nothing imports it until a FlashInfer path runs, and ``available`` says whether one can.

The workspace is made once per process group and hidden size (a collective: every rank makes it at the same call)
for tensors up to ``MAX_BYTES``. It is the TensorRT-LLM backend's, asked for by name: the MNNVL backend that
``backend="auto"`` prefers where multicast exists needs NVLink multicast, which stays off (``symm_mem.MULTICAST_OFF``).
It is called as vLLM calls it: the residual updated in place, the normalized rows (or their FP8 codes, ``x /
scale``) returned, the ranks' rows summed in fp32 (``fp32_acc``; FlashInfer's default sums in the input dtype, one
rounding per rank, which at TP=4 moves FP8 codes by more than one step), and one-shot or two-shot chosen by vLLM's
one-shot bound for the GPU's capability and TP size (``FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB``).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

from .collectives import group_size, process_group
from .numerics import FP8_DTYPE
from .symm_mem import SYMM_MEM_MAX_BYTES as MAX_BYTES  # the largest tensor a workspace holds
from .symm_mem import MiB

_WORKSPACES: dict[tuple[str, int, torch.dtype], object] = {}


def available() -> bool:
    """Whether flashinfer-python is installed (its kernels build on first use, on a GPU with nvcc)."""
    return importlib.util.find_spec("flashinfer") is not None


def _comm():
    try:
        import flashinfer.comm as comm
    except ImportError as exc:
        raise RuntimeError("collectives.allreduce_backend: flashinfer needs flashinfer-python "
                           f"(pip install flashinfer-python): {exc}") from exc
    return comm


def _workspace(group_name: str, hidden: int, dtype: torch.dtype):
    key = (group_name, hidden, dtype)
    if key not in _WORKSPACES:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("FlashInfer's all-reduce workspace must be made before CUDA graph capture; run the op "
                               "once eagerly first")
        group = process_group(group_name)
        _WORKSPACES[key] = _comm().create_allreduce_fusion_workspace(
            backend="trtllm", world_size=dist.get_world_size(group), rank=dist.get_rank(group),
            max_token_num=MAX_BYTES // (hidden * dtype.itemsize), hidden_dim=hidden, dtype=dtype, group=group)
    return _WORKSPACES[key]


def _use_one_shot(x: torch.Tensor, world: int) -> bool:
    """vLLM's choice of FlashInfer's form: one-shot up to its table's bound for this capability and TP size, and
    where the table has none."""
    from fusiontune.passes.fusions import FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB  # the tables live with the passes

    major, minor = torch.cuda.get_device_capability(x.device)
    bound = FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB.get(major * 10 + minor, {}).get(world)
    return bound is None or x.numel() * x.element_size() <= bound * MiB


def allreduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           scale: torch.Tensor | None, group_name: str) -> torch.Tensor:
    """The fused op by FlashInfer: this rank's normalized rows (FP8 codes with ``scale``), its residual updated in
    place to residual + the all-reduced ``x``."""
    comm = _comm()
    x = x.contiguous()
    if x.numel() * x.element_size() > MAX_BYTES:
        raise ValueError(f"FlashInfer's fused all-reduce takes tensors up to {MAX_BYTES // MiB} MiB; this one is "
                         f"{x.numel() * x.element_size() / MiB:g} MiB")
    res = residual if residual.is_contiguous() else residual.contiguous()
    workspace = _workspace(group_name, x.shape[-1], x.dtype)
    out = torch.empty(x.shape, dtype=FP8_DTYPE if scale is not None else x.dtype, device=x.device)
    pattern = comm.AllReduceFusionPattern
    outputs = ({"pattern": pattern.kARResidualRMSNormFP8Quant, "quant_out": out, "scale_factor": scale.float()}
               if scale is not None else {"pattern": pattern.kARResidualRMSNorm, "norm_out": out})
    comm.allreduce_fusion(input=x, workspace=workspace, launch_with_pdl=True, residual_in=res, residual_out=res,
                          rms_gamma=weight, rms_eps=eps, fp32_acc=True,
                          use_oneshot=_use_one_shot(x, group_size(group_name)), **outputs)
    if res is not residual:
        residual.copy_(res)
    return out
