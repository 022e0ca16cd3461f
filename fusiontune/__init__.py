"""fusiontune: which compile-time fusions pay off on *your* model, GPUs and batch sizes.

Sub-packages: ``fusiontune.kernels`` (custom ops), ``fusiontune.passes`` (PassConfig and the Inductor passes),
``fusiontune.harness`` (model, Ray workers, sweeps, results, reports).
"""

__version__ = "0.1.0"
