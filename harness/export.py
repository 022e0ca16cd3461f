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
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from fusiontune.passes.fusions import FUSION_FLAGS, PASSES, THRESHOLDS
from fusiontune.passes.vllm_versions import NEWEST, fit, newest_with, release

from .per_range import for_tune_run
from .analysis import noise_floor
from .results import RunFolder, redact
from .tune_spec import expected_ratio


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


def export_tuned(run_dir: str | Path, out_root: str | Path = "thresholds", force: bool = False,
                 vllm_version: str = NEWEST) -> Path:
    """Write the tune run's pick for ``vllm_version``; refused (unless ``force``) where it does not beat all fusions
    off beyond the noise floor: such a file would tell a deployment to turn on what measured no faster. Where that
    vLLM cannot run the pick (a fusion it removed), the best measured config it can run is written instead, with
    what the difference costs; where the run measured none, the export is refused."""
    try:
        target = release(vllm_version)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
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
    measured = _pass_fields(first)
    fields = vllm_fields({**measured, **plan["pass_config"]} if composed else measured)
    config_id = best["config_id"]
    expected = 1 / plan["expected_ratio"] if composed else best.get("expected_speedup")
    fields, blocked = fit(fields, target.version)
    cannot = None
    if blocked:  # this vLLM cannot run the pick: the best measured config it can run, and what that costs
        alternative = _best_runnable(table, summary, target.version)
        if alternative is None:
            raise ExportError(f"{folder.path}: vLLM {target.version} cannot run the tuned pick: it turns on "
                              f"{', '.join(blocked)} ({target.why}), and the run measured no other config without "
                              "them at every size. Tune with those fusions fixed off, or export for a vLLM that has "
                              f"them (--vllm-version {newest_with(blocked)})")
        config_id, ratio = alternative
        cannot = {"fusions": blocked, "why": target.why, "tuned_config_id": best["config_id"],
                  "tuned_expected_speedup": expected, "expected_speedup": 1 / ratio,
                  "cost": f"{expected * ratio - 1:.2%} more expected forward time than the tuned pick"}
        first = table[(table["config_id"] == config_id) & (table["status"] == "ok")].iloc[0]
        measured = _pass_fields(first)
        fields, _ = fit(vllm_fields(measured), target.version)
        composed, expected = False, 1 / ratio
    manifest = json.loads(folder.manifest_path.read_text()) if folder.manifest_path.exists() else {}
    payload = {
        "device": device,
        "tp": tp,
        "model": {k[len("model_"):]: _plain(first[k]) for k in first.index if k.startswith("model_")},
        "quant": quant,
        "optimization_level": level,
        "pass_config": fields,
        "vllm": {"version": target.version, "compilation_config": {"pass_config": fields},
                 "flags": vllm_flags(level, fields), "cannot_run": cannot},
        "evidence": {
            "run": folder.path.name,
            "run_created": manifest.get("created"),
            "git_revision": manifest.get("git_revision"),
            "software": manifest.get("software"),
            "study": summary.get("study"),
            "trials": summary.get("trials"),
            "configs_measured": summary.get("evaluations"),
            "trial": best.get("trial"),
            "unconfirmed": bool(summary.get("unconfirmed")),  # the study's best, not measured again in one run
            "source": ("per-range plan: each size's fastest measured config, composed (its sizes were measured, "
                       "not this PassConfig as one run)" if composed else f"measured config {config_id}"),
            "expected_speedup": expected,
            "best_single_expected_speedup": best.get("expected_speedup"),
            "per_range": plan,
            "noise_floor": summary.get("noise_floor"),
            "workload_weights": summary.get("weights"),
            "per_num_tokens": _per_size(table, config_id, tp),
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


def _pass_fields(row: pd.Series) -> dict[str, Any]:
    """A row's resolved fusion flags and thresholds."""
    return {k: row[k] for k in list(FUSION_FLAGS) + list(THRESHOLDS) if k in row}


def _best_runnable(table: pd.DataFrame, summary: dict[str, Any], version: str) -> tuple[str, float] | None:
    """The measured config (all-off aside) with the lowest expected forward time under the tune's workload among
    those ``version`` can run, and that expected ratio to all-off; None where there is none."""
    weights = {int(n): w for n, w in (summary.get("weights") or {}).items() if w > 0}
    baseline = {int(n): ms for n, ms in (summary.get("baseline_ms") or {}).items()}
    all_off = table["is_baseline"].fillna(False).astype(bool) | table["baseline_repeat"].fillna(False).astype(bool)
    ok = table[(table["status"] == "ok") & ~all_off]
    best = None
    for config_id, rows in ok.groupby("config_id"):
        first = rows.iloc[0]
        flags = {k: bool(first[k]) for k in FUSION_FLAGS if k in first and not pd.isna(first[k])}
        if fit(flags, version)[1]:
            continue
        ratio = expected_ratio(rows.set_index("num_tokens")["latency_ms"].to_dict(), baseline, weights)
        if math.isfinite(ratio) and (best is None or ratio < best[1]):
            best = (str(config_id), ratio)
    return best


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


def flags_for(data: dict[str, Any], path: Path, version: str = NEWEST) -> str:
    """A thresholds file's vLLM flags for the release the user runs: a field it removed that is off is dropped;
    one that is on means the file's pick cannot run there, which is an error naming the way out."""
    try:
        target = release(version)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    fields, blocked = fit(data["pass_config"], target.version)
    if blocked:
        raise ExportError(f"{path}: its pick turns on {', '.join(blocked)}, which vLLM {target.version} cannot run "
                          f"({target.why}). Exporting its tune run ({data['evidence']['run']}) with --vllm-version "
                          f"{target.version} writes the best measured config that vLLM can run, where there is one")
    return vllm_flags(int(data["optimization_level"]), fields)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
