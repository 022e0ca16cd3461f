"""What PassConfig's level defaults depend on: the hardware and the deployment, described as plain data.

A ``Platform`` can describe a machine we are not on (to ask "what would O2 do on an H100 at TP=4?") or be read off
the current one with ``Platform.detect``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

Vendor = Literal["cuda", "rocm", "cpu"]
# The ops fusiontune's model always runs as custom (opaque) kernels; vLLM lets Inductor generate some of them.
CUSTOM_OPS = frozenset({"rms_norm", "quant_fp8", "silu_and_mul"})


@dataclass(frozen=True)
class Platform:
    vendor: Vendor = "cpu"
    capability: int | None = None  # compute capability as vLLM writes it: 90 for sm90, 100 for sm100
    tp_size: int = 1
    hidden_size: int = 4096
    dtype_bytes: int = 2  # element size of the activations the collectives move
    quant: str = "none"  # the model's quant scheme (fp8-static, ..., nvfp4)
    custom_ops: frozenset[str] = field(default=CUSTOM_OPS)
    flashinfer: bool = False  # flashinfer-python importable
    aiter: bool = False  # ROCm AITER kernels enabled
    aiter_triton_gemm: bool = False


    def describe(self) -> str:
        return f"{self._chip()}, TP={self.tp_size}, hidden={self.hidden_size}, quant={self.quant}"

    def hardware(self) -> str:
        """What the level defaults read off the machine: vendor, compute capability, FlashInfer."""
        return f"{self._chip()}{' with FlashInfer' if self.flashinfer else ''}"

    def _chip(self) -> str:
        return f"{self.vendor}{f' sm{self.capability}' if self.capability else ''}"

    def with_(self, **changes) -> "Platform":
        return replace(self, **changes)

    def on_cpu(self) -> "Platform":
        """The same deployment run on CPUs (``cluster.device: cpu`` on any machine): no GPU kernels, FlashInfer's
        included."""
        return replace(self, vendor="cpu", capability=None, flashinfer=False)

    @classmethod
    def detect(cls, tp_size: int = 1, hidden_size: int = 4096, dtype_bytes: int = 2, quant: str = "none") -> "Platform":
        vendor: Vendor = "cpu"
        capability = None
        if torch.cuda.is_available():
            vendor = "rocm" if torch.version.hip else "cuda"
            major, minor = torch.cuda.get_device_capability()
            capability = major * 10 + minor
        return cls(
            vendor=vendor,
            capability=capability,
            tp_size=tp_size,
            hidden_size=hidden_size,
            dtype_bytes=dtype_bytes,
            quant=quant,
            flashinfer=vendor == "cuda" and importlib.util.find_spec("flashinfer") is not None,  # GPU kernels only
        )
