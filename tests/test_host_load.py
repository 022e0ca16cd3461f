"""The host's CPU time beyond the TP group's own while a size is timed (harness/host_load.py): a process outside
the group counts as other work, the group's own processes do not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fusiontune.harness.host_load import HostLoad, group_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds, read here from /proc (not through the module under test)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_busy_process_outside_the_group_is_other_work_and_one_inside_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the spinner is running
        alone, with_it = HostLoad(group_pids(None)), HostLoad(group_pids(None) + [spinner.pid])
        spun, began = _cpu_s(spinner.pid), time.monotonic()
        started_alone, started_with = alone.start(), with_it.start()
        # a whole CPU on an idle host; on a busy one (the tests run in parallel) it gets less,
        # so the window lasts until it has had 0.6 CPU-seconds
        while _cpu_s(spinner.pid) - spun < 0.6 and time.monotonic() - began < 50:
            time.sleep(0.1)
        outside, inside = alone.other_cpus(started_alone), with_it.other_cpus(started_with)
        spinner_s, elapsed = _cpu_s(spinner.pid) - spun, time.monotonic() - began
    finally:
        spinner.kill()
        spinner.wait()
    # The spinner's CPU is other work only when it is not one of the group's processes: the two windows open and
    # close together, so they differ by its CPU-seconds, to /proc's ticks (1/100 s) and a few ms of skew.
    assert spinner_s >= 0.6 and outside >= inside, (spinner_s, outside, inside)
    assert abs((outside - inside) * elapsed - spinner_s) <= 0.1, (spinner_s, elapsed, outside, inside)


def test_an_unreadable_window_says_nothing():
    load = HostLoad(group_pids(None))
    assert load.other_cpus(None) is None
    started = load.start()
    assert load.other_cpus((started[0] + 1e9, *started[1:])) is None  # a window that has not begun
