"""Shared test set-up.

README's test command runs the tests in parallel (pytest-xdist, ``-n auto --dist loadgroup``): the interpreter
kernel tests and the compile tests spread over the workers, while every test that starts a Ray is marked
``xdist_group("ray")`` and runs in one worker, one after another. test_multinode ends its cluster with ``ray stop``,
which stops every Ray on the machine, and two sweeps timed at once would each time the other's load.
``python3 -m pytest -q`` without ``-n`` runs everything in one process.
"""

import os

import pytest
import torch

# An xdist worker starts with COLUMNS=80 and LINES=24 in its environment, which a plain run does not have. Rich would
# fix the CLI's console at 80 columns when fusiontune.cli is imported, and the CLI tests set COLUMNS per invocation.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)

# Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
