"""Shared test set-up.

README's test command runs the tests in parallel (pytest-xdist, ``-n auto --dist loadgroup``): the interpreter
kernel tests and the compile tests spread over the workers, while every test that starts a Ray is marked
``xdist_group("ray")`` and runs in one worker, one after another. Two Rays at once on a 2-core CI host would slow
each other's measurements past their time limits, and test_multinode ends its cluster with ``ray stop``, which stops
every Ray on the machine. ``python3 -m pytest -q`` without ``-n`` runs everything in one process, as before.

The Ray group is the run's longest stretch (about 16 of its minutes alone on 2 cores), so it goes first (xdist
hands out the largest group first) and keeps its priority: a worker that runs a test outside the group lowers its
own CPU priority for good (``os.nice``), so on 2 cores the other worker's tests fill the Ray tests' idle time
instead of slowing them.
"""

import os

import pytest
import torch

# An xdist worker starts with COLUMNS=80 and LINES=24 in its environment, which a plain run does not have. Rich would
# fix the CLI's console at 80 columns when fusiontune.cli is imported, and the CLI tests set COLUMNS per invocation.
for name in ("COLUMNS", "LINES"):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.pop(name, None)

# Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


OUTSIDE_THE_RAY_GROUP_NICENESS = 10


def pytest_runtest_setup(item):
    """Under xdist, a test outside the Ray group runs at lower CPU priority (this module's docstring says why)."""
    if (os.environ.get("PYTEST_XDIST_WORKER") and item.get_closest_marker("xdist_group") is None
            and os.nice(0) < OUTSIDE_THE_RAY_GROUP_NICENESS):
        os.nice(OUTSIDE_THE_RAY_GROUP_NICENESS - os.nice(0))
