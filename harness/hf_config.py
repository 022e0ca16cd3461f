"""Model shapes from a Hugging Face ``config.json``: a sweep of the user's own model (``model: {hf_config: PATH}``)
without copying its shape into overrides by hand.

Only what the timed model has is read: the hidden size, layer count, attention heads and KV heads, the head size,
the MLP width, RoPE's base and the norm's epsilon, and what the architecture implies (Qwen3's Q/K norm, gpt-oss's
padded hidden size). RoPE scaling (Llama 3.1's "llama3" rope_scaling) changes the values in the cos/sin table, not
the kernels or their shapes, so it is not modelled. ``max_position_embeddings`` sizes the paged KV cache up to
``model.DEFAULT_MAX_POSITION`` (a 128k-position cache would size it for contexts no forward here reaches;
``model.max_position`` overrides either). A mixture-of-experts model is
timed as a dense one whose MLP is one expert wide. Nothing is downloaded: the path is a file on this machine,
relative to where fusiontune runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .model import DEFAULT_MAX_POSITION, ModelConfig

# Architectures read, and what each implies beyond the common keys.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "GptOssForCausalLM": {"hidden_pad_multiple": 256},
}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
MAX_BYTES = 1024 * 1024


def read_hf_config(path: str | Path) -> ModelConfig:
    """The model shape ``path`` describes; a ValueError naming the file and the key where it cannot be read."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"hf_config {path}: larger than {MAX_BYTES} bytes; a config.json is a few kB")
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"hf_config {path}: cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"hf_config {path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"hf_config {path}: a config.json is a JSON object")
    architectures = data.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    if architecture not in ARCHITECTURES:
        raise ValueError(f"hf_config {path}: architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ValueError(f"hf_config {path}: no {', '.join(missing)} (a {architecture} config.json has them)")
    heads = _positive(data, "num_attention_heads", path)
    return ModelConfig(
        name=_name(data, path),
        hidden_size=_positive(data, "hidden_size", path),
        num_layers=_positive(data, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=_positive(data, "num_key_value_heads", path) if data.get("num_key_value_heads") else heads,
        intermediate_size=_positive(data, "intermediate_size", path),
        head_dim=_positive(data, "head_dim", path) if data.get("head_dim") else None,
        rope_theta=float(data.get("rope_theta", 10000.0)),
        rms_eps=float(data.get("rms_norm_eps", 1e-6)),
        max_position=min(_positive(data, "max_position_embeddings", path), DEFAULT_MAX_POSITION)
        if data.get("max_position_embeddings") else DEFAULT_MAX_POSITION,
        **ARCHITECTURES[architecture],
    )


def _positive(data: dict[str, Any], key: str, path: Path) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"hf_config {path}: {key} is {value!r}; it must be a whole number >= 1")
    return value


def _name(data: dict[str, Any], path: Path) -> str:
    """The model's name: its hub id's last part where the file says it, else its folder's name (HF's layout is
    <model>/config.json), else the file's."""
    named = data.get("_name_or_path")
    if isinstance(named, str) and named.strip("/"):
        return named.strip("/").split("/")[-1]
    return path.parent.name if path.stem == "config" and path.parent.name else path.stem
