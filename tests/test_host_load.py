"""The host's CPU time beyond the TP group's own while a size is timed (harness/host_load.py): a process outside
the group counts as other work, the group's own processes do not."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fusiontune.harness.host_load import HostLoad, group_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_busy_process_outside_the_group_is_other_work_and_one_inside_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the spinner is running
        alone, with_it = HostLoad(group_pids(None)), HostLoad(group_pids(None) + [spinner.pid])
        started_alone, started_with = alone.start(), with_it.start()
        time.sleep(1.5)
        outside, inside = alone.other_cpus(started_alone), with_it.other_cpus(started_with)
    finally:
        spinner.kill()
        spinner.wait()
    # the spinner keeps one CPU busy: counted as other work only when it is not one of the group's processes
    assert outside >= 0.6 and outside - inside >= 0.6, (outside, inside)


def test_an_unreadable_window_says_nothing():
    load = HostLoad(group_pids(None))
    assert load.other_cpus(None) is None
    started = load.start()
    assert load.other_cpus((started[0] + 1e9, *started[1:])) is None  # a window that has not begun
