"""The run folder: rows appended as they are measured, a Parquet table rebuilt from them, and a manifest.

``rows.jsonl`` is the durable log (one JSON object a line, flushed per config), so a killed sweep loses at most
the config in flight; ``results.parquet`` is rewritten from it after every config for analysis tools.
``manifest.json`` records where and with what the run was made; credentials never enter it. Beside them:
``kernels.jsonl`` / ``kernels.parquet`` (time per kernel and category, per config and num_tokens), ``traces/``
(gzipped Chrome traces that Perfetto opens) and ``logs/`` (one log per config, every rank's lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from fusiontune.passes.fusions import THRESHOLDS

from .rows import MEASURED_COLUMNS, PASS_COLUMNS, ROW_KEY


def redact(text: str | None) -> str | None:
    """Drop the password (and any token in the query) from a URL-like string."""
    if text is None:
        return None
    text = re.sub(r"(?<=://)([^:/@\s]+):[^@/\s]+@", r"\1:***@", text)
    return re.sub(r"(?i)((?:token|password|secret|key)=)[^&\s]+", r"\1***", text)


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.path / "rows.jsonl"
        self.parquet_path = self.path / "results.parquet"
        self.manifest_path = self.path / "manifest.json"
        self.kernels_path = self.path / "kernels.jsonl"
        self.kernels_parquet_path = self.path / "kernels.parquet"

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        _append_lines(self.rows_path, rows)
        self.write_parquet()

    def rows(self) -> list[dict[str, Any]]:
        return _read_lines(self.rows_path)

    def append_kernels(self, rows: list[dict[str, Any]]) -> None:
        """Per-kernel times of one config; a re-measured (config, TP, num_tokens) replaces the earlier rows."""
        if not rows:
            return
        _append_lines(self.kernels_path, rows)
        frame = pd.DataFrame(_read_lines(self.kernels_path))
        key = ["config_id", "tp", "num_tokens"]
        frame = frame[frame["measured_at"] == frame.groupby(key)["measured_at"].transform("max")]
        _write_atomically(frame, self.kernels_parquet_path)

    def kernels(self) -> pd.DataFrame:
        if self.kernels_parquet_path.exists():
            return pd.read_parquet(self.kernels_parquet_path)
        return pd.DataFrame()

    def write_trace(self, name: str, gzipped_trace: bytes) -> Path:
        path = self.path / "traces" / f"{name}.json.gz"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzipped_trace)
        return path

    def write_log(self, name: str, text: str) -> Path:
        path = self.path / "logs" / f"{name}.log"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:  # a resumed config's new attempt goes below the old one
            f.write(redact(text))
        return path

    def table(self) -> pd.DataFrame:
        """The run's rows as a table: ``results.parquet``, rebuilt from ``rows.jsonl`` (the durable log) where it
        is missing, unreadable or holds fewer rows than the log."""
        rows = self.rows()
        if self.parquet_path.exists():
            try:
                table = pd.read_parquet(self.parquet_path)
            except Exception:  # noqa: BLE001 - a torn or foreign file: the log says what was measured
                table = None
            if table is not None and (not rows or len(table) >= len(latest_rows(rows))):
                return _with_all_columns(table)
        if rows:
            self.write_parquet()
        return _to_frame(rows)

    def set_aside(self) -> Path:
        """Move everything an earlier run wrote (rows, tables, reports, figures, a tune's summary and study, logs,
        traces) into ``earlier/<time>/``, so that nothing stale sits beside the new run."""
        marker = self.rows_path if self.rows_path.exists() else self.path
        stamp = datetime.fromtimestamp(marker.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        kept = self.path / "earlier" / stamp
        for n in range(2, 10_000):  # two runs set aside within a second keep a folder each (never one over another)
            if not kept.exists():
                break
            kept = self.path / "earlier" / f"{stamp}-{n}"
        kept.mkdir(parents=True)
        for item in self.path.iterdir():
            if item.name != "earlier":
                item.rename(kept / item.name)
        return kept

    def begin(self, text: str, source: str, kind: str, resume: bool, extra: dict[str, Any]) -> str | None:
        """Open the folder for a run of ``kind`` ("sweep", "tune" or "tune-grid"; a tune always resumes its study):
        the one place a run's folder is made ready. A resume of the same kind of run keeps everything and notes the
        time in the manifest; otherwise every earlier output is set aside first (``set_aside``) and a new manifest
        written. Returns what to tell the user when something was moved, else None."""
        earlier = self.manifest().get("kind", "sweep") if self.manifest_path.exists() else None
        if resume and (earlier is None or _family(earlier) == _family(kind)):
            if earlier is None:
                self.write_manifest(text, source, {"kind": kind, **extra})
            else:
                self.update_manifest(resumed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            return None
        said = None
        if any(item.name != "earlier" for item in self.path.iterdir()):
            said = f"an earlier {earlier or 'run'} in {self.path} was moved to {self.set_aside()}"
        self.write_manifest(text, source, {"kind": kind, **extra})
        return said

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    def write_parquet(self) -> None:
        _write_atomically(_to_frame(self.rows()), self.parquet_path)

    def write_manifest(self, sweep_text: str, sweep_path: str, extra: dict[str, Any]) -> None:
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sweep_file": sweep_path,
            "sweep": redact(sweep_text),
            "host": {"machine": host_platform.machine(), "system": host_platform.system(),
                     "python": sys.version.split()[0]},
            "software": software_versions(),
            "git_revision": git_revision(),
            "source_digest": source_digest(),
            **{k: redact(v) if isinstance(v, str) else v for k, v in extra.items()},
        }
        self.manifest_path.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        self.manifest_path.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _family(kind: str) -> str:
    """Runs of one family share a folder's outputs: a tune and its grid share the study file."""
    return "tune" if kind.startswith("tune") else kind


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, TP, num_tokens): a resumed run re-measures some, and the last measurement wins."""
    latest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        latest[tuple(row.get(k) for k in ROW_KEY)] = row
    return list(latest.values())


# A config skipped for want of GPUs says this: a resume on a larger cluster runs it.
RESUMABLE_SKIP = "--resume on a cluster with enough GPUs runs it"


def measured_sizes(rows: list[dict[str, Any]]) -> dict[tuple[str, int], set[int]]:
    """Per (config_id, tp), the sizes a resume need not measure again: each size's latest row, unless ``failed``
    or skipped for want of GPUs."""
    sizes: dict[tuple[str, int], set[int]] = {}
    for row in latest_rows(rows):
        if row.get("config_id"):
            kept = sizes.setdefault((row["config_id"], row["tp"]), set())
            if row["status"] != "failed" and RESUMABLE_SKIP not in str(row.get("error") or ""):
                kept.add(row.get("num_tokens"))
    return sizes


def completed_configs(rows: list[dict[str, Any]], num_tokens: Iterable[int] | None = None) -> set[tuple[str, int]]:
    """(config_id, tp) pairs a resume need not run again: a row for every size of ``num_tokens`` (a row lost to a
    torn last line leaves its config incomplete), none of them ``failed``, none skipped for want of GPUs."""
    sizes: dict[tuple[str, int], set[int]] = {}
    for row in latest_rows(rows):
        if row.get("config_id"):
            sizes.setdefault((row["config_id"], row["tp"]), set()).add(row.get("num_tokens"))
    measured = measured_sizes(rows)
    wanted = set(num_tokens) if num_tokens is not None else None
    return {key for key, seen in sizes.items()
            if measured[key] == seen and (wanted is None or wanted <= seen)}


def torn_tail(path: Path) -> bool:
    """Whether the file's last line was cut short (a crash mid-write)."""
    if not path.exists() or not path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _append_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    if torn_tail(path):  # a line a crash cut short holds no row: drop it, so the next row starts a line of its own
        data = path.read_bytes()
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def _write_atomically(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _with_all_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the measured columns (NaN) and the baseline flags (False) that a run which measured nothing,
    or rows from before a column existed, lack."""
    if frame.empty:
        return frame
    for column in MEASURED_COLUMNS:
        if column not in frame:
            frame[column] = float("nan")
    for column in ("is_baseline", "baseline_repeat"):
        frame[column] = frame[column].fillna(False).astype(bool) if column in frame else False
    frame["schema_version"] = frame["schema_version"].fillna(1).astype(int) if "schema_version" in frame else 1
    return frame


def _to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = _with_all_columns(pd.DataFrame(latest_rows(rows)))
    for column in PASS_COLUMNS:
        if column in frame and frame[column].dtype == object:
            frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in THRESHOLDS else frame[column]
    return frame


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("fusiontune", "torch", "triton", "ray", "optuna", "pydantic", "pandas", "flashinfer-python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    import torch

    found["cuda"] = str(torch.version.cuda)
    return found


def source_digest(folders: dict[str, Path] | None = None) -> str:
    """A digest of the code that ran (every .py file of the package, by path and content): it names the code even
    where ``git_revision`` cannot, as on a machine sent a copy of the working tree beside an older ``.git``.
    ``folders``: package name -> folder (default: fusiontune's own, the same names installed or editable)."""
    import importlib

    if folders is None:
        folders = {name: Path(importlib.import_module(name).__file__).parent
                   for name in ("fusiontune", "fusiontune.harness", "fusiontune.kernels", "fusiontune.passes")}
    digest = hashlib.sha256()
    for package, folder in folders.items():
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{package}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
