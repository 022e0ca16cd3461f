"""Tuned thresholds per hardware: written from a tune run, and found again for a device and model shape.

A file is named by what it was tuned on, ``thresholds/<device>/tp<N>-hidden<H>-<quant>.json``. It holds the
PassConfig that won (the study's best config, or its per-range plan where that gains beyond the noise floor and
vLLM's thresholds can express it: ``per_range``), the evidence it won with (run, study, expected speedup, noise
floor, per-size speedups), and the same PassConfig as vLLM takes it: a ``--compilation-config`` JSON and
``-O<level> -cc.pass_config.<field>=...`` flags. Only PassConfig's fields go there, and they are vLLM's names.
Explicit fields win over the level's defaults in vLLM as in fusiontune, so every fusion flag and every threshold in
use is written out.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS, PASSES, THRESHOLDS

from .per_range import for_tune_run
from .report import noise_floor
from .results import RunFolder, redact


class ExportError(ValueError):
    """A run that cannot be exported, or no thresholds file for a device; the message says what to do."""


def device_dir(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'; CPU rows ('cpu (2 cores, 2 threads)') -> 'cpu'."""
    if device.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device.strip()).strip("_") or "unknown"


def file_name(tp: int, hidden: int, quant: str) -> str:
    return f"tp{tp}-hidden{hidden}-{quant}.json"


def vllm_fields(resolved: dict[str, Any]) -> dict[str, Any]:
    """The PassConfig to hand to vLLM: every fusion flag, and the thresholds of the fusions that are on."""
    used = {t.name for spec in PASSES if resolved.get(spec.flag) for t in spec.thresholds}
    fields = {flag: bool(resolved[flag]) for flag in FUSION_FLAGS if flag in resolved}
    fields.update({name: THRESHOLDS[name].type(_plain(resolved[name])) for name in THRESHOLDS
                   if name in used and resolved.get(name) is not None and not pd.isna(resolved[name])})
    return fields


def vllm_flags(level: int, fields: dict[str, Any]) -> str:
    return " ".join([f"-O{level}"] + [f"-cc.pass_config.{k}={v}" for k, v in fields.items()])


def export_tuned(run_dir: str | Path, out_root: str | Path = "thresholds", force: bool = False) -> Path:
    """Write the tune run's pick; refused (unless ``force``) where it does not beat all fusions off beyond the
    noise floor: such a file would tell a deployment to turn on what measured no faster."""
    if not Path(run_dir).is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    folder = RunFolder(run_dir)
    summary_path = folder.path / "tune.json"
    if not summary_path.exists():
        raise ExportError(f"{folder.path} is not a tune run (no tune.json): export reads what `fusiontune tune` "
                          "wrote")
    summary = json.loads(summary_path.read_text())
    best = summary.get("best")
    if not best:
        raise ExportError(f"{summary_path}: the study has no completed trial to export")
    table = folder.table()
    plan = for_tune_run(table, summary)  # by the current rules, from the run's rows
    composed = _composed(plan, summary.get("noise_floor"))
    rows = table[(table["config_id"] == best["config_id"]) & (table["status"] == "ok")]
    if rows.empty:
        raise ExportError(f"{folder.path}: no measured rows of the best config {best['config_id']}")
    first = rows.iloc[0]
    device = next((d for d in table["device"].dropna() if d), "")
    if not device:
        raise ExportError(f"{folder.path}: the rows do not say which device they were measured on")
    tp, hidden, quant = int(first["tp"]), int(first["model_hidden_size"]), str(first["model_quant"])
    level = int(first["optimization_level"])
    measured = {k: first[k] for k in list(FUSION_FLAGS) + list(THRESHOLDS) if k in first}
    fields = vllm_fields({**measured, **plan["pass_config"]} if composed else measured)
    manifest = json.loads(folder.manifest_path.read_text()) if folder.manifest_path.exists() else {}
    payload = {
        "device": device,
        "tp": tp,
        "model": {k[len("model_"):]: _plain(first[k]) for k in first.index if k.startswith("model_")},
        "quant": quant,
        "optimization_level": level,
        "pass_config": fields,
        "vllm": {"compilation_config": {"pass_config": fields}, "flags": vllm_flags(level, fields)},
        "evidence": {
            "run": folder.path.name,
            "run_created": manifest.get("created"),
            "git_revision": manifest.get("git_revision"),
            "software": manifest.get("software"),
            "study": summary.get("study"),
            "trials": summary.get("trials"),
            "configs_measured": summary.get("evaluations"),
            "trial": best.get("trial"),
            "source": ("per-range plan: each size's fastest measured config, composed (its sizes were measured, "
                       "not this PassConfig as one run)" if composed else f"measured config {best['config_id']}"),
            "expected_speedup": 1 / plan["expected_ratio"] if composed else best.get("expected_speedup"),
            "best_single_expected_speedup": best.get("expected_speedup"),
            "per_range": plan,
            "noise_floor": summary.get("noise_floor"),
            "workload_weights": summary.get("weights"),
            "per_num_tokens": _per_size(table, best["config_id"], tp),
        },
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    expected, floor = payload["evidence"]["expected_speedup"], summary.get("noise_floor") or 0.0
    if not force and (expected is None or expected - 1 <= floor):
        shown = f"{expected:.3f}x" if expected is not None else "unknown"
        raise ExportError(f"{folder.path}: the tuned config's expected speedup is {shown} (noise floor "
                          f"{floor:.2%}): it does not beat all fusions off beyond noise, so nothing was exported "
                          "(--force writes it anyway)")
    path = Path(out_root) / device_dir(device) / file_name(tp, hidden, quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact(json.dumps(payload, indent=2, default=_plain)) + "\n")
    return path


def _composed(plan: dict[str, Any] | None, floor: float | None) -> bool:
    """Export the per-range plan instead of the best single config: only where vLLM can express it, it differs
    somewhere, and it gains more than the objective's noise floor."""
    if not plan or not plan.get("expressible") or not plan.get("departs"):
        return False
    return plan["gain_over_single"] > (floor if floor is not None else float("inf"))


def _per_size(table: pd.DataFrame, config_id: str, tp: int) -> list[dict[str, Any]]:
    ok = table[(table["status"] == "ok") & (table["tp"] == tp)]
    config = ok[ok["config_id"] == config_id].set_index("num_tokens")["latency_ms"]
    floors = noise_floor(table)
    floors = floors[floors["tp"] == tp].set_index("num_tokens")
    out = []
    for n, latency in config.sort_index().items():
        if n not in floors.index:
            continue
        base = floors.at[n, "baseline_ms"]
        floor = floors.at[n, "noise_floor"]
        out.append({"num_tokens": int(n), "baseline_ms": float(base), "latency_ms": float(latency),
                    "speedup": float(base / latency), "noise_floor": None if pd.isna(floor) else float(floor)})
    return out


def find_thresholds(device: str, tp: int, hidden: int, quant: str,
                    root: str | Path = "thresholds") -> tuple[Path, dict[str, Any], str]:
    """The thresholds file for this device, TP size and quant scheme with the nearest hidden size, and a note
    saying which it took and why."""
    root = Path(root)
    here = root / device_dir(device)
    if not here.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ExportError(f"no thresholds for {device!r} under {root}; devices there: {', '.join(known) or 'none'} "
                          "(tune on this device and `fusiontune export` the run)")
    candidates = []
    for path in here.glob(f"tp{tp}-hidden*-{quant}.json"):
        match = re.fullmatch(rf"tp{tp}-hidden(\d+)-{re.escape(quant)}\.json", path.name)
        if match:
            candidates.append((abs(int(match.group(1)) - hidden), -int(match.group(1)), path))
    if not candidates:
        have = sorted(p.name for p in here.glob("*.json"))
        raise ExportError(f"no thresholds for TP={tp}, {quant} on {device!r}; files there: {', '.join(have) or 'none'}")
    distance, _, path = min(candidates)
    took = int(re.search(r"hidden(\d+)", path.name).group(1))
    note = (f"took {path} (tuned at hidden {took}, the exact size)" if distance == 0 else
            f"took {path}: tuned at hidden {took}, the nearest to {hidden} of {len(candidates)} file(s)")
    return path, json.loads(path.read_text()), note


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
