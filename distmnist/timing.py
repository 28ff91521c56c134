"""Where the wall time went: process start-up as the kernel saw it (for run.json and the benchmark)."""

from __future__ import annotations

import os


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was started (interpreter and imports included); Linux only."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
