"""How busy the host's CPUs were with other work while a size was timed.

A config timed while another process (a build, a neighbour's job, another TP group compiling) keeps the host's
CPUs busy is measured under load: where the host is on the critical path (a CPU forward, an eager GPU forward) that
slows it and not its baseline, or the other way round. So each rank reads the host's busy CPU time
(``/proc/stat``) and the CPU time of its TP group's processes on this host (``/proc/<pid>/stat``) before and after a
size's timing. What the host spent beyond the group, in CPUs busy on average over the window (1.0: one CPU
throughout), is the row's ``host_other_cpus``. The analysis labels a host-bound row "busy host" from
``BUSY_HOST_CPUS`` on; a CUDA-graph replay does not wait on the host, so its rows only record it.

Linux only: elsewhere (or where /proc cannot be read) nothing is recorded.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

# Fields of /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal (guest time is inside user).
_BUSY_FIELDS, _IDLE_FIELDS = (0, 1, 2, 5, 6, 7), (3, 4)


def _host_busy_s() -> float:
    """The host's busy CPU time so far, all CPUs together, in seconds."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[i] for i in _BUSY_FIELDS if i < len(values)) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def group_pids(group) -> list[int]:
    """The processes of this rank's TP group that run on this host (a collective over ``group``; this process
    alone without one)."""
    mine = (socket.gethostname(), os.getpid())
    if group is None:
        return [mine[1]]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return [pid for host, pid in everyone if host == mine[0]]


class HostLoad:
    """Windows over which the host's CPU time beyond the TP group's own is measured."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def start(self) -> tuple[float, float, float] | None:
        try:
            return time.monotonic(), _host_busy_s(), sum(_process_cpu_s(pid) for pid in self.pids)
        except (OSError, ValueError, IndexError):  # not Linux, or a /proc this code cannot read
            return None

    def other_cpus(self, started: tuple[float, float, float] | None) -> float | None:
        """CPUs busy with other work, on average, since ``started`` (``start``'s answer); None where unknown."""
        now = self.start()
        if started is None or now is None or now[0] <= started[0]:
            return None
        other = (now[1] - started[1]) - (now[2] - started[2])
        return max(0.0, other / (now[0] - started[0]))
