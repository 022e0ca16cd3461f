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

``--build MODULE ...`` compiles FlashInfer's modules here, with no GPU, into ``.whl/aot/`` (then ``--prebuilt``
packs them): ``norm`` (its RMSNorm kernels, bench-kernels' peer), ``prefill`` (single-sequence prefill attention, bf16,
head size 128, the FA3 and FA2 backends, bench-kernels' attention peer) and ``comm`` (``trtllm_comm``, the fused
all-reduce). FlashInfer compiles at first use on the GPU machine otherwise: 235-480 s of device time for
``trtllm_comm`` (tenth session), lost with every new checkout, since ``.whl/`` is not committed. Here nvcc targets
sm_90a (``FLASHINFER_CUDA_ARCH_LIST``); the cuBLAS and cuRAND headers FlashInfer's common headers include come
from the nvidia-cublas and nvidia-curand wheels (their include/ only), and the link's ``-lcuda`` from a stub (the
driver's library is there at run time). Run it in a virtual environment that has the flashinfer-python wheel and
torch (the CPU build does): on 2 cores about 1 minute for ``norm``, 9 for ``prefill`` (both backends), 6 for
``comm``.

Usage here:  python scripts/flashinfer_kit.py [--python 3.12] [--build norm prefill comm] [--prebuilt]
(downloads with pip; writes .whl/)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import io
import lzma
import os
import shutil
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
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp",
                    *[arg for platform in platforms for arg in ("--platform", platform)], "-d", str(dest),
                    *requirements], check=True)


# their include/ hold cublasLt.h and curand_kernel.h, which FlashInfer's trtllm/common headers include
HEADER_WHEELS = ["nvidia-cublas>=13,<14", "nvidia-curand>=10.4,<11"]
BUILD_ARCHES = "9.0a"  # Hopper, the lent GPUs


def _module_specs(names: list[str]):
    """FlashInfer's JIT specs for the named modules (imported only after the build environment is set)."""
    import torch
    from flashinfer.jit.attention import gen_single_prefill_module
    from flashinfer.jit.comm import gen_trtllm_comm_module
    from flashinfer.jit.norm import gen_norm_module

    made = {
        "norm": lambda: [gen_norm_module()],
        # what bench-kernels' attention peer calls: single_prefill_with_kv_cache(q, k, v, causal=True) on bf16 q/k/v
        # of head size 128, no position encoding, window, soft cap or fp16 QK reduction; FA3 where the GPU has it
        "prefill": lambda: [gen_single_prefill_module(backend, torch.bfloat16, torch.bfloat16, torch.bfloat16, 128,
                                                      128, 0, False, False, False) for backend in ("fa3", "fa2")],
        "comm": lambda: [gen_trtllm_comm_module()],
    }
    return [spec for name in names for spec in made[name]()]


def build_modules(names: list[str], aot: Path) -> list[Path]:
    """Compile FlashInfer's modules here for sm_90a and copy each built ``NAME.so`` into ``aot``."""
    if importlib.util.find_spec("flashinfer") is None:
        print("--build: flashinfer is not importable here; in a virtual environment: pip install torch==2.13.0 "
              f"{FLASHINFER} (the wheel's dependencies come with it), then run this script there", file=sys.stderr)
        raise SystemExit(2)
    cuda = _cuda_home()
    work = Path(tempfile.mkdtemp(prefix="flashinfer-build-"))
    include = work / "headers"
    download(HEADER_WHEELS, "3.12", work)
    for found in work.glob("nvidia_*.whl"):
        with zipfile.ZipFile(found) as wheel:
            wheel.extractall(include, [n for n in wheel.namelist() if "/include/" in n and not n.endswith("/")])
    headers = next(include.rglob("cublasLt.h")).parent
    stub = work / "stub"  # an empty libcuda.so with the driver library's soname: what the link needs here
    stub.mkdir()
    (stub / "empty.c").write_text("")
    subprocess.run(["gcc", "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(stub / "libcuda.so"),
                    str(stub / "empty.c")], check=True)
    os.environ.update({
        "FLASHINFER_CUDA_ARCH_LIST": BUILD_ARCHES, "FLASHINFER_WORKSPACE_BASE": str(work),
        "FLASHINFER_EXTRA_CUDAFLAGS": f"-I{headers}", "FLASHINFER_EXTRA_LDFLAGS": f"-L{cuda / 'lib64'} -L{stub}",
        "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))})
    aot.mkdir(parents=True, exist_ok=True)
    built = []
    for spec in _module_specs(names):
        print(f"building {spec.name} ...", flush=True)
        spec.build(verbose=False)
        built.append(Path(shutil.copy(spec.get_library_path(), aot / f"{spec.name}.so")))
    shutil.rmtree(work, ignore_errors=True)
    return built


def _cuda_home() -> Path:
    """Where the CUDA toolkit's lib64/libcudart.so is: CUDA_HOME, /usr/local/cuda, or above nvcc (here
    /usr/local/bin/nvcc is a script that runs the toolkit's own, so its folder has no lib64)."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and Path(nvcc).resolve().parent.parent):
        if home and (Path(home) / "lib64" / "libcudart.so").exists():
            return Path(home)
    print("--build: no CUDA toolkit with lib64/libcudart.so found; set CUDA_HOME", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--prebuilt", action="store_true",
                        help="FlashInfer without what a compile needs, to carry beside .carry (needs .whl/aot/)")
    parser.add_argument("--build", nargs="+", choices=["norm", "prefill", "comm"], default=[],
                        help="compile these FlashInfer modules here (no GPU needed) into OUT/aot/ first")
    args = parser.parse_args()
    aot = args.out / "aot"
    for module in build_modules(args.build, aot) if args.build else []:
        print(f"built {module} ({module.stat().st_size / 2**20:.1f} MiB)")
    if args.prebuilt and not (list(aot.glob("*.so")) or list(aot.glob("*.so.xz"))):
        print(f"--prebuilt: {aot}/ holds no built module; build them first (--build norm prefill comm, here; or "
              f"scripts/device_compare_allreduce.sh sends back trtllm_comm.so: put it in {aot}/)", file=sys.stderr)
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
