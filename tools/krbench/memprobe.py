"""Process memory probes on Linux ``/proc`` (used by the benchmark and the step-cost tool)."""
from __future__ import annotations


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``); None where unavailable."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``); False where the kernel does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False
