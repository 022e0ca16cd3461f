"""A Llama-style decoder stack built from fusiontune's ops, tensor-parallel over a process group.

Per layer, as vLLM runs a prefill: (add +) RMSNorm -> QKV projection -> [per-head Q/K RMSNorm] -> RoPE -> write K
and V to the paged KV cache -> causal attention -> o_proj -> all-reduce -> add + RMSNorm -> gate_up -> SiLU*Mul ->
down -> all-reduce. A forward is a prefill of one sequence of num_tokens tokens at positions 0..num_tokens-1, or,
with ``decode_context`` > 0, a decode step: num_tokens sequences, each with that many tokens already cached (random
values) and one new token, whose attention reads the paged cache through a block table. With FP8 quant,
each linear quantises its input (static per-tensor, dynamic per-token or per-group) and runs a scaled matmul, so
the graph holds exactly the op pairs the fusion passes look for.

Shapes are real (presets of public model configs); weights are random and reproducible from a seed. There is no
embedding or LM head: the input is the hidden states, and every fusion lives in the decoder stack. gpt-oss-20b is
a mixture of experts; here its MLP is one dense expert of the real size (hidden 2880, intermediate 2880).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d

import fusiontune.kernels  # noqa: F401  (registers torch.ops.fusiontune)
from fusiontune.kernels import QUANT_SCHEMES, numerics
from fusiontune.kernels.numerics import FP8_DTYPE, FP8_MAX

ops = torch.ops.fusiontune
QUANT_CHOICES = ("none", *QUANT_SCHEMES)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Positions the paged KV cache holds unless the model has fewer (or model.max_position says otherwise): no forward
# here reaches further, and a 128k-position cache per layer would only cost memory.
DEFAULT_MAX_POSITION = 32768


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # hidden_size // num_heads unless the model says otherwise
    qk_norm: bool = False  # Qwen3-style per-head RMSNorm on Q and K before RoPE
    rope_style: str = "neox"  # neox (rotate halves; Llama, Qwen) or gptj (rotate adjacent pairs)
    # MLP input zero-padded to a multiple of this (0: never), as gpt-oss pads 2880 to 3072 for its MoE kernels
    hidden_pad_multiple: int = 0
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_position: int = DEFAULT_MAX_POSITION
    kv_block_size: int = 16  # tokens per block of the paged KV cache (max_position slots per layer)
    # 0: a forward is a prefill of one sequence of num_tokens tokens. > 0: a decode step of num_tokens sequences,
    # each with this many tokens already in the cache and one new token, attending over the cache.
    decode_context: int = 0
    dtype: str = "bfloat16"
    quant: str = "none"  # none | fp8-static | fp8-per-token | fp8-per-group
    group_size: int = 128  # for fp8-per-group

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_input_size(self) -> int:
        """The hidden size after the MLP input's padding (unchanged where there is none)."""
        multiple = self.hidden_pad_multiple
        return numerics.round_up(self.hidden_size, multiple) if multiple else self.hidden_size

    @property
    def pads_mlp_input(self) -> bool:
        return self.mlp_input_size != self.hidden_size

    @property
    def cache_slots(self) -> int:
        return math.ceil(self.max_position / self.kv_block_size) * self.kv_block_size

    def blocks_per_sequence(self) -> int:
        """Cache blocks one decode sequence holds: its context and the new token."""
        return math.ceil((self.decode_context + 1) / self.kv_block_size)

    def cache_problem(self, num_tokens: int) -> str | None:
        """Why ``num_tokens`` does not fit this model's positions or KV cache (None: it fits)."""
        if not self.decode_context:
            if num_tokens > self.max_position:
                return (f"num_tokens={num_tokens} exceeds the model's max_position={self.max_position} (raise "
                        "model.max_position in the sweep file)")
            return None
        needed = num_tokens * self.blocks_per_sequence() * self.kv_block_size
        if self.decode_context >= self.max_position or needed > self.cache_slots:
            return (f"a decode step of {num_tokens} sequences with {self.decode_context} cached tokens each needs "
                    f"{needed} cache slots and position {self.decode_context}; the cache holds max_position="
                    f"{self.max_position} (raise model.max_position in the sweep file)")
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_overrides(self, **overrides) -> "ModelConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return {**asdict(self), "head_dim": self.head_size}

    def sharding_problems(self, tp: int) -> list[str]:
        """Why this shape cannot run at this TP size with this quant scheme (empty: it can)."""
        problems = []
        if tp < 1:
            return [f"TP size must be >= 1, got {tp}"]
        for field in ("num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, field)
            if value % tp:
                problems.append(f"TP={tp} cannot shard {field}={value} ({value} is not a multiple of {tp})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}: give head_dim")
        if self.quant == "fp8-per-group" and not problems:
            inputs = {
                "hidden_size (qkv input)": self.hidden_size,
                "MLP input after padding (gate_up input)": self.mlp_input_size,
                "attention output per rank (o_proj input)": self.num_heads // tp * self.head_size,
                "intermediate_size per rank (down input)": self.intermediate_size // tp,
            }
            for what, k in inputs.items():
                if k % self.group_size:
                    problems.append(
                        f"fp8-per-group with group_size={self.group_size} needs {what}={k} to be a multiple of "
                        f"{self.group_size}"
                    )
        return problems


class Linear(nn.Module):
    """A (sharded) linear layer: bf16/fp16 weights, or FP8 weights with per-output-channel scales whose input is
    quantised by the model's scheme right here, so the quant op directly follows whatever produced ``x``."""

    def __init__(self, in_features: int, out_features: int, cfg: ModelConfig, generator: torch.Generator, device):
        super().__init__()
        weight = torch.randn(out_features, in_features, generator=generator, device=device) / math.sqrt(in_features)
        self.quant = cfg.quant
        self.group_size = cfg.group_size
        self.out_dtype = cfg.torch_dtype
        if cfg.quant == "none":
            self.weight = nn.Parameter(weight.to(cfg.torch_dtype), requires_grad=False)
            return
        if cfg.quant == "fp8-per-group":  # block-quantised weights, as per-group (DeepSeek-style) checkpoints ship
            w_scale = numerics.weight_block_scales(weight, cfg.group_size)
            per_element = numerics.expand_block_scales(w_scale, tuple(weight.shape), cfg.group_size)
        else:
            w_scale = (weight.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            per_element = w_scale[:, None]
        self.weight = nn.Parameter((weight / per_element).to(FP8_DTYPE), requires_grad=False)
        self.register_buffer("weight_scale", w_scale.float())
        # Static per-tensor input scale: set by calibrate_static_scales, as a checkpoint would ship it.
        self.register_buffer("input_scale", torch.ones(1, device=device))
        self.calibrating = False
        self.observed_amax = torch.zeros((), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant == "none":
            return x @ self.weight.t()
        if self.calibrating:
            self.observed_amax = torch.maximum(self.observed_amax, x.abs().amax().float())
        group = 0
        if self.quant == "fp8-static":
            q, scale = ops.quant_fp8_static(x, self.input_scale), self.input_scale
        elif self.quant == "fp8-per-token":
            q, scale = ops.quant_fp8_per_token(x)
        else:
            q, scale = ops.quant_fp8_per_group(x, self.group_size)
            group = self.group_size
        return ops.scaled_mm(q, scale, self.weight, self.weight_scale, group, self.out_dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, cfg: ModelConfig, generator: torch.Generator, device):
        super().__init__()
        weight = 1.0 + 0.1 * torch.randn(size, generator=generator, device=device)
        self.weight = nn.Parameter(weight.to(cfg.torch_dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Plain norm, or (with ``residual``) residual <- x + residual in place and the norm of the sum."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def rotary_cache(cfg: ModelConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_size // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_position, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, group_name: str | None, generator: torch.Generator,
                 replicated: torch.Generator, device):
        """``generator`` draws this rank's weight shards; ``replicated`` the weights every rank holds alike (the
        norms), so they agree across ranks as one checkpoint's would: sequence parallelism normalises each rank's
        rows with its own copy."""
        super().__init__()
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = cfg.num_kv_heads // tp
        self.head_dim = cfg.head_size
        self.rope_is_neox = cfg.rope_style == "neox"
        self.group_name = group_name
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_split = (q_size, kv_size, kv_size)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg, replicated, device)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, cfg, generator, device)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_eps, cfg, replicated, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_eps, cfg, replicated, device) if cfg.qk_norm else None
        self.o_proj = Linear(q_size, cfg.hidden_size, cfg, generator, device)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg, replicated, device)
        self.mlp_padding = cfg.mlp_input_size - cfg.hidden_size
        cache_shape = (cfg.cache_slots // cfg.kv_block_size, cfg.kv_block_size, self.num_kv_heads, self.head_dim)
        for name in ("k_cache", "v_cache"):  # a decode step attends over the cached context: give it values
            cache = torch.randn(cache_shape, generator=generator, device=device) if cfg.decode_context else \
                torch.zeros(cache_shape, device=device)
            self.register_buffer(name, cache.to(cfg.torch_dtype), persistent=False)
        self.context_len = cfg.decode_context + 1 if cfg.decode_context else 0
        self.gate_up_proj = Linear(cfg.mlp_input_size, 2 * (cfg.intermediate_size // tp), cfg, generator, device)
        self.down_proj = Linear(cfg.intermediate_size // tp, cfg.hidden_size, cfg, generator, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group_name is None else ops.all_reduce(x, self.group_name)

    def attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  block_table: torch.Tensor | None) -> torch.Tensor:
        num_tokens = h.shape[0]
        q, k, v = self.qkv_proj(h).split(self.qkv_split, dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = ops.rotary_embedding(q, k, cos, sin, self.rope_is_neox)
        ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, slots)
        if block_table is None:  # prefill: causal attention over the sequence's own q, k, v
            return ops.attention(q, k, v, self.head_dim ** -0.5)  # [num_tokens, heads * head_dim]
        return ops.paged_attention(q, self.k_cache, self.v_cache, block_table, self.context_len, self.head_dim ** -0.5)

    def forward(self, x, residual, cos, sin, slots, block_table, first: bool):
        # Layer 0 norms its input directly (residual already holds it); later layers add x to the residual first.
        h = self.input_norm(x) if first else self.input_norm(x, residual)
        x = self.all_reduce(self.o_proj(self.attention(h, cos, sin, slots, block_table)))
        h = self.post_attention_norm(x, residual)
        if self.mlp_padding:
            h = torch.nn.functional.pad(h, (0, self.mlp_padding))
        x = self.all_reduce(self.down_proj(ops.silu_and_mul(self.gate_up_proj(h))))
        return x


class DecoderStack(nn.Module):
    """``forward(hidden_states [num_tokens, hidden]) -> final-normed hidden states``; positions 0..num_tokens-1."""

    def __init__(self, cfg: ModelConfig, tp: int = 1, rank: int = 0, group_name: str | None = None,
                 seed: int = 0, device="cpu"):
        super().__init__()
        problems = cfg.sharding_problems(tp)
        if problems:
            raise ValueError("; ".join(problems))
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
        replicated = torch.Generator(device=device).manual_seed(seed * 1000 + 999)
        self.cfg = cfg
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp, group_name if tp > 1 else None, generator, replicated, device)
            for _ in range(cfg.num_layers)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg, replicated, device)
        cos, sin = rotary_cache(cfg, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.group_name = group_name if tp > 1 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens, device = hidden_states.shape[0], hidden_states.device
        context, block = self.cfg.decode_context, self.cfg.kv_block_size
        if context:  # num_tokens sequences, each at position `context`, blocks b * per_seq ... (b + 1) * per_seq - 1
            per_seq = self.cfg.blocks_per_sequence()
            cos = self.rope_cos[context:context + 1].expand(num_tokens, -1)
            sin = self.rope_sin[context:context + 1].expand(num_tokens, -1)
            slots = torch.arange(num_tokens, device=device) * (per_seq * block) + context
            block_table = torch.arange(num_tokens * per_seq, device=device).view(num_tokens, per_seq)
        else:  # one sequence at positions 0 .. num_tokens - 1, cached from slot 0
            cos, sin = self.rope_cos[:num_tokens], self.rope_sin[:num_tokens]
            slots, block_table = torch.arange(num_tokens, device=device), None
        residual = hidden_states.clone()  # updated in place by every fused add + norm; the input stays intact
        x = hidden_states
        for i, layer in enumerate(self.layers):
            x = layer(x, residual, cos, sin, slots, block_table, first=i == 0)
        return self.final_norm(x, residual)

    @torch.no_grad()
    def calibrate_static_scales(self, hidden_states: torch.Tensor) -> None:
        """Set every static input scale to amax / 448 over one eager forward (max over TP ranks)."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and m.quant == "fp8-static"]
        if not linears:
            return
        for m in linears:
            m.calibrating = True
            m.observed_amax = torch.zeros((), device=hidden_states.device)
            m.input_scale.fill_(1.0)
        self(hidden_states)
        amax = torch.stack([m.observed_amax for m in linears])
        if self.group_name is not None:  # one scale per layer across ranks, as one checkpoint holds
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=distributed_c10d._resolve_process_group(self.group_name))
        for m, a in zip(linears, amax):
            m.input_scale.fill_(max(float(a) / FP8_MAX, 1e-12))
            m.calibrating = False
