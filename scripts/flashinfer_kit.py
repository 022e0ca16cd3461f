"""Build ``.whl/``: the wheels a device call needs to run FlashInfer's fused all-reduce, small enough to carry
(a call carries 64 MiB; flashinfer-python's wheel alone is 62 MB).

What is kept of flashinfer-python: its Python files, the headers its communication kernels include (data/include,
data/cccl, data/spdlog, the top-level headers of data/csrc) and the three sources of its ``trtllm_comm`` JIT module;
not its other kernel sources, cutlass, or prebuilt kernels. Beside it: the packages ``import flashinfer.comm``
needs (apache-tvm-ffi, cuda-bindings, nvidia-ml-py, ninja, ...), and pydantic for fusiontune itself (the call
carries no ``.carry``). The device setup (scripts/device_setup.sh) installs ``.whl/*.whl``, and any module
FlashInfer built on an earlier call (``.whl/aot/NAME.so``, 12 MB for ``trtllm_comm``, sent back by
scripts/device_compare_allreduce.sh) where FlashInfer loads prebuilt modules instead of compiling (235-480 s).
Rebuilding the kit keeps ``.whl/aot/``.

``--prebuilt`` (once ``.whl/aot/`` holds the built modules) writes the kit a sweep can carry beside ``.carry``
(Ray's kit, about 40 MB; a call carries 64 MiB): FlashInfer's Python files alone as ``flashinfer-prebuilt.tar.xz``
(7 MB; without the headers and sources only a compile needs), the built modules xz-compressed (``NAME.so.xz``,
4 MB for ``trtllm_comm``), and the dependencies that ``.carry`` lacks (not pydantic, not ninja). About 23 MB.

Usage here:  python scripts/flashinfer_kit.py [--python 3.12] [--prebuilt]   (downloads with pip; writes .whl/)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FLASHINFER = "flashinfer-python==0.7.2.post1"
DEPENDENCIES = ["apache-tvm-ffi<0.2,>=0.1.11", "cuda-bindings>=13,<14", "cuda-pathfinder", "nvidia-ml-py", "einops",
                "tabulate", "ninja", "click", "tqdm", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types",
                "typing-inspection"]
COMM_SOURCES = {"trtllm_allreduce.cu", "trtllm_allreduce_fusion.cu", "trtllm_moe_allreduce_fusion.cu"}
# What .carry (../shared/device/carry-kit.sh) already holds, and what only a compile needs: left out with --prebuilt.
IN_CARRY_OR_COMPILE = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "ninja"}
PREBUILT_TAR = "flashinfer-prebuilt.tar.xz"


def kept(name: str) -> bool:
    """Whether a file of the flashinfer-python wheel goes into the trimmed one."""
    if ".dist-info/" in name:
        return not name.endswith("RECORD")
    if not name.startswith("flashinfer/"):
        return False
    if name.startswith("flashinfer/data/"):
        rest = name[len("flashinfer/data/"):]
        if rest.startswith(("include/", "spdlog/", "cccl/")):
            return True
        if rest.startswith("csrc/"):
            leaf = rest[len("csrc/"):]
            return "/" not in leaf and (leaf in COMM_SOURCES or leaf.endswith((".h", ".cuh")))
        return False
    return name.endswith((".py", ".pyi", ".json", ".typed"))


def trim(wheel: Path, out: Path) -> None:
    """Write the trimmed wheel with a RECORD that matches its files (pip checks it)."""
    records, dist_info = [], None
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.is_dir() or not kept(info.filename):
                continue
            data = src.read(info.filename)
            dst.writestr(info.filename, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{info.filename},sha256={digest},{len(data)}")
            if ".dist-info/" in info.filename:
                dist_info = info.filename.split("/")[0]
        dst.writestr(f"{dist_info}/RECORD", "\n".join(records + [f"{dist_info}/RECORD,,"]) + "\n")


def python_files_tar(wheel: Path, out: Path) -> None:
    """FlashInfer's Python files and its metadata (no RECORD: nothing checks a tree unpacked from a tar), as the
    xz-compressed tar ``device_setup.sh`` unpacks into the site folder."""
    with zipfile.ZipFile(wheel) as src, tarfile.open(out, "w:xz", preset=9) as dst:
        for info in src.infolist():
            name = info.filename
            keep = (".dist-info/" in name and not name.endswith("RECORD")) or (
                name.startswith("flashinfer/") and not name.startswith("flashinfer/data/")
                and name.endswith((".py", ".pyi", ".json", ".typed")))
            if info.is_dir() or not keep:
                continue
            data = src.read(name)
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o644
            dst.addfile(member, io.BytesIO(data))


def compress_modules(aot: Path) -> list[Path]:
    """Each built module ``aot/NAME.so`` as ``aot/NAME.so.xz`` (the .so removed); the compressed modules."""
    for so in sorted(aot.glob("*.so")):
        so.with_suffix(".so.xz").write_bytes(lzma.compress(so.read_bytes(), preset=9))
        so.unlink()
    return sorted(aot.glob("*.so.xz"))


def _name(requirement: str) -> str:
    for mark in "<>=!~ ;[":
        requirement = requirement.split(mark)[0]
    return requirement.strip().lower().replace("_", "-")


def download(requirements: list[str], python: str, dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(dest),
                    *requirements], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--prebuilt", action="store_true",
                        help="FlashInfer without what a compile needs, to carry beside .carry (needs .whl/aot/)")
    args = parser.parse_args()
    aot = args.out / "aot"
    if args.prebuilt and not (list(aot.glob("*.so")) or list(aot.glob("*.so.xz"))):
        print(f"--prebuilt: {aot}/ holds no built module; build it first (scripts/device_compare_allreduce.sh sends "
              f"back trtllm_comm.so: put it in {aot}/)", file=sys.stderr)
        raise SystemExit(2)
    for old in [*args.out.glob("*.whl"), *args.out.glob(PREBUILT_TAR)]:  # .whl/aot/ (built on a GPU machine) stays
        old.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download([FLASHINFER], args.python, Path(tmp))
        wheel = next(Path(tmp).glob("flashinfer_python-*.whl"))
        if args.prebuilt:
            python_files_tar(wheel, args.out / PREBUILT_TAR)
        else:
            trim(wheel, args.out / wheel.name)
    needed = [r for r in DEPENDENCIES if not (args.prebuilt and _name(r) in IN_CARRY_OR_COMPILE)]
    download(needed, args.python, args.out)
    if args.prebuilt:
        compress_modules(aot)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels{', ' + PREBUILT_TAR if args.prebuilt else ''}, "
          f"{total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
