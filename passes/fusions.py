"""Every pass fusiontune knows, declared once: flag, what it fuses, num_tokens range, level default, thresholds.

PassConfig's fields, the optimization-level defaults, the sweep's no-op checks, the result columns
(``matches_<flag>``) and ``fusiontune passes`` are all read from ``PASSES``. Defaults follow vLLM's fusion page
(shared/reference/vllm-fusion-passes.md): the "Default at" column and the Support Matrix.

A default rule takes (level, platform) and returns (on?, why). A threshold's rule takes the platform and returns
(value, why); ``None`` means "this platform has no value", which switches the threshold's passes off unless the
user gives one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from .platform import Platform

Rule = Callable[[int, Platform], "tuple[bool, str]"]
ThresholdRule = Callable[[Platform], "tuple[float | int | None, str]"]
TokenRange = Literal["always", "low", "high"]
MiB = 1024 * 1024


@dataclass(frozen=True)
class Threshold:
    name: str
    type: type
    description: str
    default: ThresholdRule

    @property
    def is_size(self) -> bool:
        """A tensor size in MB (the all-reduce bound) rather than a num_tokens."""
        return self.name.endswith("_size_mb")

    def as_tokens(self, value: float, hidden_size: int, dtype_bytes: int) -> int:
        """The num_tokens this threshold's value stands for: as many as fit in it, for a size."""
        return int(value * MiB // (hidden_size * dtype_bytes)) if self.is_size else int(value)

    def from_tokens(self, tokens: int, hidden_size: int, dtype_bytes: int) -> float | int:
        """The value that puts this threshold at ``tokens``: their tensor's size, for a size."""
        return tokens * hidden_size * dtype_bytes / MiB if self.is_size else self.type(tokens)


@dataclass(frozen=True)
class PassSpec:
    flag: str
    title: str
    fuses: str
    token_range: TokenRange
    default: Rule
    fullgraph: bool = False
    kind: Literal["fusion", "cleanup"] = "fusion"
    thresholds: tuple[Threshold, ...] = ()
    requires: tuple[str, ...] = ()  # flags this pass needs on (switched on with it unless the user said no)
    # Model quant schemes the pass has patterns for (None: any). A pass for another scheme matches nothing.
    quant_schemes: tuple[str, ...] | None = None
    needs_tp: bool = False  # a collective fusion: nothing to match at TP=1
    needs_model: str | None = None  # a ModelConfig flag the model must have for the pattern to exist (qk_norm)
    splits_tokens: bool = False  # shards num_tokens over the TP group: sizes that do not split run without it
    # Where the fusion lives below the pass: the fusiontune ops it swaps in (torch.ops.fusiontune.*), the file of
    # their CUDA kernel, and the bench-kernels cases (--op; --tp N for a collective) that time it alone.
    ops: tuple[str, ...] = ()
    kernel: str | None = None
    bench: tuple[str, ...] = ()

    def token_bound(self, values: dict, platform: Platform) -> int | None:
        """The num_tokens edge of this pass's range under resolved ``values``: the largest num_tokens a "low" pass
        applies to, the smallest a "high" pass applies to; None where the range is unbounded (or, for a pass
        with a threshold, where the platform has no value for it)."""
        if self.token_range == "always" or not self.thresholds:
            return None
        threshold = self.thresholds[0]
        value = values.get(threshold.name)
        if value is None:
            return None
        return threshold.as_tokens(value, platform.hidden_size, platform.dtype_bytes)

    def range_text(self, values: dict, platform: Platform) -> str:
        bound = self.token_bound(values, platform)
        if self.token_range == "always":
            return "every num_tokens"
        if self.token_range == "low":
            return f"num_tokens <= {bound}" if bound is not None else "low range (below the first range split)"
        return f"num_tokens >= {bound}" if bound is not None else "high range (no threshold on this platform)"

    def applicability(self, quant: str, tp_size: int, model=None) -> tuple[bool, str]:
        """Can this pass find anything in fusiontune's model with this quant scheme and TP size (and, given the
        model's config, this model)?"""
        if self.quant_schemes is not None and quant not in self.quant_schemes:
            return False, f"{self.flag} has no pattern for quant={quant} (it fuses {', '.join(self.quant_schemes)})"
        if self.needs_tp and tp_size == 1:
            return False, f"{self.flag} fuses a collective, and TP=1 has none"
        if self.needs_model and model is not None and not getattr(model, self.needs_model):
            return False, f"{self.flag} needs a model with {self.needs_model} ({model.name} has none)"
        return True, ""


def off(_level: int, _platform: Platform) -> tuple[bool, str]:
    return False, "off at every optimization level (set it explicitly)"


def from_level(level_needed: int, condition: Callable[[Platform], tuple[bool, str]]) -> Rule:
    def rule(level: int, platform: Platform) -> tuple[bool, str]:
        if level < level_needed:
            return False, f"O{level} < O{level_needed}"
        ok, why = condition(platform)
        return ok, f"O{level} >= O{level_needed} and {why}" if ok else f"O{level}, but {why}"

    return rule


def always(_platform: Platform) -> tuple[bool, str]:
    return True, "no platform condition"


def custom_kernel_in_use(*ops: str, nvfp4_too: bool = False) -> Callable[[Platform], tuple[bool, str]]:
    def condition(platform: Platform) -> tuple[bool, str]:
        used = [op for op in ops if op in platform.custom_ops]
        if used:
            return True, f"custom {'/'.join(used)} kernel in use"
        if nvfp4_too and platform.quant == "nvfp4":
            return True, "NVFP4 model (FP4 quant is always a custom op)"
        return False, f"no custom {'/'.join(ops)} kernel (Inductor's generated code is faster)"

    return condition


def allreduce_rms_condition(platform: Platform) -> tuple[bool, str]:
    if platform.vendor != "cuda" or platform.capability not in FI_ALLREDUCE_FUSION_MAX_SIZE_MB:
        return False, f"needs a GPU vLLM {VLLM_TABLES} has a fused all-reduce table for (sm" + \
            ", sm".join(map(str, FI_ALLREDUCE_FUSION_MAX_SIZE_MB)) + ")"
    if platform.tp_size <= 1:
        return False, "needs TP > 1"
    if not platform.flashinfer:
        return False, "needs FlashInfer installed"
    return True, f"sm{platform.capability}, TP={platform.tp_size}, FlashInfer installed"


def rocm_aiter(platform: Platform) -> tuple[bool, str]:
    if platform.vendor == "rocm" and platform.aiter:
        return True, "ROCm with AITER"
    return False, "ROCm/AITER only"


def act_padding_condition(platform: Platform) -> tuple[bool, str]:
    ok, why = rocm_aiter(platform)
    if not ok:
        return ok, why
    if platform.hidden_size != 2880:
        return False, f"hidden size {platform.hidden_size} != 2880 (gpt-oss)"
    if platform.aiter_triton_gemm:
        return False, "AITER Triton GEMMs are enabled"
    return True, "ROCm/AITER, hidden 2880, AITER Triton GEMMs off"


# vLLM's tables (compute capability -> TP size -> MB) for the FlashInfer all-reduce fusion size limit.
# vLLM's hand tables (vllm/compilation/passes/fusion/allreduce_rms_fusion.py in vLLM 0.33.0): the largest tensor
# (MB) that takes the fused all-reduce + norm, and the separate bound of its one-shot form, by compute capability
# and TP size. A TP size a capability does not list gets no default (vLLM leaves the fusion off there).
VLLM_TABLES = "0.33"
FI_ALLREDUCE_FUSION_MAX_SIZE_MB: dict[int, dict[int, float]] = {
    90: {2: 64, 4: 2, 8: 0.5},
    100: {2: 64, 4: 32, 8: 1, 16: 64},
    103: {2: 64, 4: 64, 8: 4, 16: 64},
    107: {2: 64, 4: 64, 8: 2},
}
FI_ALLREDUCE_ONE_SHOT_MAX_SIZE_MB: dict[int, dict[int, float]] = {
    90: {2: 32, 4: 2, 8: 0.5},
    100: {2: 32, 4: 4, 8: 1},
    103: {2: 32, 4: 4, 8: 2},
    107: {2: 32, 4: 4, 8: 2},
}
# Sequence parallelism's start, from vLLM 0.31 (its last release with SP): the smallest hidden size, and the
# per-GPU tensor size above which SP starts, per capability.
SP_TABLES = "0.31"
SP_MIN_HIDDEN_SIZE: dict[int, int] = {90: 8192, 100: 8192}
SP_MIN_PER_GPU_SIZE_MB: dict[int, float] = {90: 8, 100: 32}


def fi_allreduce_max_size(platform: Platform) -> tuple[float | None, str]:
    by_tp = FI_ALLREDUCE_FUSION_MAX_SIZE_MB.get(platform.capability or -1, {})
    if platform.vendor != "cuda" or platform.tp_size not in by_tp:
        return None, f"no default for {platform.describe()}"
    return by_tp[platform.tp_size], f"vLLM {VLLM_TABLES}'s table for sm{platform.capability}, TP={platform.tp_size}"


def sp_min_tokens(platform: Platform) -> tuple[int | None, str]:
    cap = platform.capability or -1
    if platform.vendor != "cuda" or cap not in SP_MIN_HIDDEN_SIZE:
        return None, f"no default for {platform.describe()} (vLLM {SP_TABLES} autoconfigured sm90/sm100 only)"
    if platform.hidden_size < SP_MIN_HIDDEN_SIZE[cap]:
        return None, f"hidden size {platform.hidden_size} < {SP_MIN_HIDDEN_SIZE[cap]}, too small for SP on sm{cap}"
    total_bytes = SP_MIN_PER_GPU_SIZE_MB[cap] * MiB * platform.tp_size
    tokens = int(total_bytes // (platform.hidden_size * platform.dtype_bytes))
    return tokens, f"{SP_MIN_PER_GPU_SIZE_MB[cap]:g} MB per GPU x TP={platform.tp_size} on sm{cap} (vLLM {SP_TABLES})"


SP_MIN_TOKEN_NUM = Threshold("sp_min_token_num", int, "num_tokens from which SP / AsyncTP apply", sp_min_tokens)
FP8 = ("fp8-static", "fp8-per-token", "fp8-per-group")

PASSES: tuple[PassSpec, ...] = (
    PassSpec(
        flag="eliminate_noops",
        title="No-op elimination",
        fuses="removes reshapes/views/slices that change nothing, so fusion patterns see adjacent ops",
        token_range="always",
        kind="cleanup",
        default=from_level(1, always),
    ),
    PassSpec(
        flag="fuse_norm_quant",
        title="RMSNorm + Quant",
        fuses="RMSNorm (+residual add) -> FP8 quant",
        token_range="always",
        default=from_level(1, custom_kernel_in_use("rms_norm", "quant_fp8")),
        quant_schemes=FP8,
        ops=tuple(f"{prefix}rms_norm_quant_fp8_{scheme}" for prefix in ("", "fused_add_")
                  for scheme in ("static", "per_token", "per_group")),
        kernel="kernels/triton_rows.py",
        bench=("rms_norm->fp8-static", "add+rms_norm->fp8-static", "rms_norm->fp8-per-token",
               "rms_norm->fp8-per-group-128"),
    ),
    PassSpec(
        flag="fuse_act_quant",
        title="SiLU+Mul + Quant",
        fuses="SiLU+Mul activation -> FP8 quant",
        token_range="always",
        default=from_level(1, custom_kernel_in_use("silu_and_mul", "quant_fp8", nvfp4_too=True)),
        quant_schemes=("fp8-static", "fp8-per-group"),
        ops=("silu_and_mul_quant_fp8_static", "silu_and_mul_quant_fp8_per_group"),
        kernel="kernels/triton_rows.py",
        bench=("silu_and_mul->fp8-static", "silu_and_mul->fp8-per-group-128"),
    ),
    PassSpec(
        flag="fuse_attn_quant",
        title="Attention + Quant",
        fuses="Attention output -> FP8 static quant",
        token_range="always",
        fullgraph=True,
        default=off,
        quant_schemes=("fp8-static",),
        ops=("attention_quant_fp8_static", "paged_attention_quant_fp8_static"),
        kernel="kernels/triton_attention.py",
        bench=("attention->fp8-static",),
    ),
    # Before RoPE + KV cache: both take the same RoPE node, and the first pass to run takes it. On the Qwen3-8B
    # shape Q/K-norm + RoPE saves 2.3-6.6% and RoPE + KV cache nothing (H100, docs/benchmarks.md, 2026-11-25).
    # vLLM never has both (one is CUDA-only, the other ROCm-only).
    PassSpec(
        flag="enable_qk_norm_rope_fusion",
        title="QK Norm + RoPE",
        fuses="Q/K per-head RMSNorm -> rotary embedding",
        token_range="low",
        default=off,
        needs_model="qk_norm",
        ops=("qk_norm_rope",),
        kernel="kernels/triton_heads.py",
        bench=("qk_norm+rotary_embedding",),
    ),
    PassSpec(
        flag="fuse_rope_kvcache",
        title="RoPE + KV-Cache Update",
        fuses="Rotary embedding -> KV cache write",
        token_range="low",
        default=from_level(2, rocm_aiter),
        thresholds=(
            Threshold(
                "rope_kvcache_fusion_max_token_num",
                int,
                "largest num_tokens that takes the fused RoPE + KV-cache kernel",
                lambda _p: (256, "vLLM's default"),
            ),
        ),
        ops=("rotary_embedding_and_cache",),
        kernel="kernels/triton_heads.py",
        bench=("rotary_embedding+kv_cache",),
    ),
    PassSpec(
        flag="enable_sp",
        title="Sequence Parallelism",
        fuses="AllReduce -> ReduceScatter + local RMSNorm + AllGather",
        token_range="high",
        fullgraph=True,
        default=off,
        thresholds=(SP_MIN_TOKEN_NUM,),
        needs_tp=True,
        splits_tokens=True,
        ops=("reduce_scatter", "all_gather"),  # NCCL's: nothing is fused, the work moves
    ),
    PassSpec(
        flag="fuse_gemm_comms",
        title="AsyncTP GEMM + collective",
        fuses="GEMM -> reduce-scatter / all-gather -> GEMM",
        token_range="high",
        fullgraph=True,
        default=off,
        thresholds=(SP_MIN_TOKEN_NUM,),
        requires=("enable_sp",),
        needs_tp=True,
        splits_tokens=True,
        ops=("all_gather_matmul", "all_gather_scaled_mm", "matmul_reduce_scatter", "scaled_mm_reduce_scatter"),
        kernel="kernels/gemm_comms.py",  # torch's symmetric-memory fused ops
        bench=("all_gather+gemm", "gemm+reduce_scatter"),
    ),
    # After SP and AsyncTP, as vLLM orders them: where both apply, sequence parallelism takes the all-reduces
    # (ranges.compile_ranges switches this pass off there, so a range never counts it as enabled and unfired).
    PassSpec(
        flag="fuse_allreduce_rms",
        title="AllReduce + RMSNorm",
        fuses="All-reduce -> RMSNorm (+residual add) (-> FP8 static quant)",
        token_range="low",
        default=from_level(2, allreduce_rms_condition),
        thresholds=(
            Threshold(
                "fi_allreduce_fusion_max_size_mb",
                float,
                "largest all-reduced tensor (MB) that takes the fused kernel",
                fi_allreduce_max_size,
            ),
        ),
        needs_tp=True,
        quant_schemes=("none", "fp8-static"),
        ops=("all_reduce_fused_add_rms_norm", "all_reduce_fused_add_rms_norm_quant_fp8_static"),
        kernel="kernels/triton_allreduce_rms.py",
        bench=("allreduce+add+rms_norm", "allreduce+add+rms_norm->fp8-static"),
    ),
    PassSpec(
        flag="fuse_act_padding",
        title="RMSNorm + Padding",
        fuses="Residual add + RMSNorm -> padding of the hidden size",
        token_range="always",
        default=from_level(1, act_padding_condition),
        needs_model="pads_mlp_input",
        ops=("fused_add_rms_norm_pad",),
        kernel="kernels/triton_rows.py",
        bench=("add+rms_norm->pad-256",),
    ),
)

PASSES_BY_FLAG: dict[str, PassSpec] = {p.flag: p for p in PASSES}
FUSION_FLAGS: tuple[str, ...] = tuple(p.flag for p in PASSES if p.kind == "fusion")
THRESHOLDS: dict[str, Threshold] = {t.name: t for p in PASSES for t in p.thresholds}
LEVELS = (0, 1, 2, 3)
