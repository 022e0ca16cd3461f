"""The model presets: config.json files of public models (``preset_configs/``), read like a user's own
(``model: {hf_config: ...}``), so a preset and a user's file are one path through ``hf_config``.

``tiny`` is ours: a Llama-shaped model small enough for CPU tests and the smoke sweep.
"""

from __future__ import annotations

from pathlib import Path

from .hf_config import read_hf_config
from .model import ModelConfig

PRESET_DIR = Path(__file__).with_name("preset_configs")
PRESETS: dict[str, ModelConfig] = {path.stem: read_hf_config(path) for path in sorted(PRESET_DIR.glob("*.json"))}


def build_model_config(preset: str, **overrides) -> ModelConfig:
    """A preset's shape with ``overrides`` laid over it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset].with_overrides(**overrides)
