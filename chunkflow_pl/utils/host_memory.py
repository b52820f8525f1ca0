"""Host memory of this process and of the machine, read from ``/proc`` (Linux), with POSIX fallbacks."""

from __future__ import annotations

import os
import resource


def current_rss_bytes() -> int:
    """Resident set of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` line of a ``/proc`` status-style file in bytes (its values are in KiB); None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's resident high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    peak = _proc_kib("/proc/self/status", "VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Make the high-water mark the current RSS (Linux >= 4.0); False where not possible. This also resets
    ``getrusage``'s ``ru_maxrss`` for anything else in the process that reads it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_host_bytes() -> int:
    """Memory the machine can still give (``MemAvailable``; free pages where /proc is missing)."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable:")
    return avail if avail is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
