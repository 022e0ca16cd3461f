"""Shared test set-up.

README's test command runs the tests in parallel (pytest-xdist, ``-n auto --dist loadgroup``): the interpreter
kernel tests and the compile tests spread over the workers, while every test that starts a Ray is marked
``xdist_group("ray")`` and runs in one worker, one after another. Two Rays at once on a 2-core CI host would slow
each other's measurements past their time limits, and test_multinode ends its cluster with ``ray stop``, which stops
every Ray on the machine. ``python3 -m pytest -q`` without ``-n`` runs everything in one process, as before.
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
