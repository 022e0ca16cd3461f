"""Model shapes from a Hugging Face config.json: written here from public shapes, nothing downloaded. The files
for the presets' models give the presets' shapes, and the presets are such files; a sweep runs from one; a bad
file is one line naming it."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict

import pandas as pd
import pytest

from fusiontune.harness.hf_config import read_hf_config
from fusiontune.harness.model import DEFAULT_MAX_POSITION
from fusiontune.harness.presets import PRESET_DIR, PRESETS, build_model_config
from fusiontune.harness.sweep import SweepError, expand, parse_sweep

# The shape keys of public config.json files (their other keys do not matter here)
PUBLIC = {
    "Meta-Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                          "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                          "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}, "torch_dtype": "bfloat16"},
    "Qwen3-8B": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "intermediate_size": 12288,
                 "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128,
                 "rms_norm_eps": 1e-06, "rope_theta": 1000000},
    "gpt-oss-20b": {"architectures": ["GptOssForCausalLM"], "hidden_size": 2880, "intermediate_size": 2880,
                    "num_attention_heads": 64, "num_hidden_layers": 24, "num_key_value_heads": 8, "head_dim": 64,
                    "rms_norm_eps": 1e-05, "rope_theta": 150000, "num_local_experts": 32},
    "Mistral-7B-v0.3": {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None},
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0},
}
SAME_AS_PRESET = {"Meta-Llama-3.1-8B": "llama-3.1-8b", "Qwen3-8B": "qwen3-8b", "gpt-oss-20b": "gpt-oss-20b"}


def write_config(folder, name, data):
    path = folder / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_a_public_config_gives_its_shape(tmp_path, model):
    cfg = read_hf_config(write_config(tmp_path, model, PUBLIC[model]))
    assert cfg.name == model and cfg.hidden_size == PUBLIC[model]["hidden_size"]
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (PUBLIC[model]["num_hidden_layers"],
                                                                 PUBLIC[model]["num_attention_heads"],
                                                                 PUBLIC[model]["num_key_value_heads"])
    if model in SAME_AS_PRESET:  # the preset is this file's shape
        assert {**asdict(cfg), "name": None} == {**asdict(PRESETS[SAME_AS_PRESET[model]]), "name": None}
    assert cfg.sharding_problems(2) == [] and cfg.sharding_problems(4) == []


def test_a_sweep_plans_from_a_config_and_overrides_apply(tmp_path):
    path = write_config(tmp_path, "Mistral-7B-v0.3", PUBLIC["Mistral-7B-v0.3"])
    spec = parse_sweep(f"name: m\nmodel: {{hf_config: {path}, num_layers: 2, quant: fp8-static}}\n"
                       "num_tokens: [1, 64]\ntp: [1, 2]\n")
    plan = expand(spec)
    assert plan.model.name == "Mistral-7B-v0.3" and plan.model.num_layers == 2 and plan.model.quant == "fp8-static"
    assert plan.model.rope_theta == 1e6 and any(c.is_baseline for c in plan.configs)


@pytest.mark.parametrize("data, message", [
    ({"architectures": ["BertModel"], "hidden_size": 768}, "architecture 'BertModel' is not supported; supported: "
                                                            "LlamaForCausalLM"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}, "no num_hidden_layers, num_attention_heads, "
                                                                  "intermediate_size"),
    ({**PUBLIC["Qwen2.5-7B"], "num_hidden_layers": "28"}, "num_hidden_layers is '28'; it must be a whole number"),
    ("{not json", "not a JSON file"),
])
def test_a_bad_config_is_one_line_naming_the_file_and_key(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(SweepError, match="model: hf_config .*config.json: ") as error:
        expand(parse_sweep(f"name: m\nmodel: {{hf_config: {path}}}\nnum_tokens: [1]\n"))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_kv_cache_holds_the_models_context_up_to_the_default(tmp_path):
    for context, slots in ((4096, 4096), (131072, DEFAULT_MAX_POSITION), (None, DEFAULT_MAX_POSITION)):
        data = {**PUBLIC["Qwen2.5-7B"], "max_position_embeddings": context}
        assert read_hf_config(write_config(tmp_path, f"ctx-{context}", data)).max_position == slots
    assert build_model_config("tiny").max_position == 8192  # its file says so
    path = write_config(tmp_path, "short", {**PUBLIC["Qwen2.5-7B"], "max_position_embeddings": 512})
    spec = parse_sweep(f"name: m\nmodel: {{hf_config: {path}}}\nnum_tokens: [1024]\n")
    assert "exceeds the model's max_position=512" in expand(spec).model.cache_problem(1024)


def test_every_preset_is_a_config_json_the_package_ships():
    files = sorted(PRESET_DIR.glob("*.json"))
    assert [f.stem for f in files] == sorted(PRESETS) and "tiny" in PRESETS
    for f in files:
        assert read_hf_config(f) == PRESETS[f.stem] and PRESETS[f.stem].name == f.stem


def test_the_model_is_a_preset_or_a_config_not_both(tmp_path):
    for model in ("{preset: tiny, hf_config: x.json}", "{quant: none}"):
        with pytest.raises(SweepError, match="model: Value error, give the model as exactly one of preset: NAME or "
                                             "hf_config: path/to/config.json"):
            parse_sweep(f"name: m\nmodel: {model}\nnum_tokens: [1]\n")


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # one Ray at a time: tests/conftest.py
def test_a_sweep_runs_from_a_config_json(tmp_path):
    """A small Llama-architecture config.json (the tiny preset's shape), run on CPU through Ray."""
    path = write_config(tmp_path, "tiny-llama", {"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                                 "intermediate_size": 512, "num_attention_heads": 4,
                                                 "num_hidden_layers": 1, "num_key_value_heads": 2})
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: hf\nmodel: {{hf_config: {path}, quant: fp8-static, max_position: 4096}}\n"
                     "num_tokens: [1, 16]\npass_config: {fuse_norm_quant: [false, true]}\n"
                     "measure: {warmup: 1, repeats: 3, max_repeats: 3, profile: false}\n")
    result = subprocess.run(["fusiontune", "run", str(sweep), "--out", str(tmp_path / "run"), "--no-report"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert (table["status"] == "ok").all() and set(table["model_name"]) == {"tiny-llama"}
    fused = table[table["fuse_norm_quant"].astype(bool) & ~table["is_baseline"].astype(bool)]
    assert not fused.empty and (fused["matches_fuse_norm_quant"] > 0).all()
