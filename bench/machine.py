"""The machine a result came from, and how busy other processes kept it during the run."""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROC = Path("/proc")
TOP_OTHERS = 5


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    cpuinfo = PROC / "cpuinfo"
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe(device: str) -> dict[str, Any]:
    """Host, CPU, software versions and the accelerator, if one is used."""
    accelerator = None
    if device != "cpu" and torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(
            torch.device(device if device != "auto" else "cuda")
        )
    return {
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": accelerator,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class _Process:
    cpu_s: float
    command: str


def stat_cpu_s(stat: Path) -> tuple[float, float]:
    """User and system CPU seconds from a ``/proc/<pid>/stat`` (a process, all its threads) or
    ``/proc/<pid>/task/<tid>/stat`` (one thread) file; OSError once it has ended."""
    fields = stat.read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _processes() -> dict[int, _Process]:
    """CPU seconds (user + system) and command line of every visible process."""
    found = {}
    for entry in PROC.glob("[0-9]*"):
        try:
            user_s, system_s = stat_cpu_s(entry / "stat")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        found[int(entry.name)] = _Process(user_s + system_s, command)
    return found


class Contention:
    """CPU time that processes other than this benchmark and its servers used while it ran.

    Processes that exit before the end are not counted, so this is a lower bound.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.load_start = os.getloadavg()
        self.before = _processes() if PROC.is_dir() else {}

    def report(self) -> dict[str, Any]:
        """Busy cores used by others on average, the busiest of them, and load averages."""
        wall_s = time.monotonic() - self.started
        after = _processes() if PROC.is_dir() else {}
        used = {
            pid: (process.cpu_s - self.before[pid].cpu_s, process.command)
            for pid, process in after.items()
            # servers under test start after `before` was taken, so only others remain
            if pid in self.before and pid != os.getpid()
        }
        busiest = sorted(used.values(), reverse=True)[:TOP_OTHERS]
        return {
            "wall_s": round(wall_s, 1),
            "other_cpu_cores_busy": round(sum(cpu for cpu, _ in used.values()) / wall_s, 3),
            "busiest_other_processes": [
                {"cpu_s": round(cpu, 1), "command": command[:120]} for cpu, command in busiest
            ],
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        }
