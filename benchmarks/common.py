"""Shared by the benchmark scripts: where a run happened, peak host memory, JSON output, medians.

Host peak memory without psutil: Linux keeps the process's resident high-water mark in
`/proc/self/status` (VmHWM) and resets it to the current RSS when "5" is written to
`/proc/self/clear_refs` (Linux >= 4.0). `PeakRSS` uses that to measure the peak of one phase as
(VmHWM at the end - VmRSS at the start). Where the reset is impossible it falls back to
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which never goes down, so a later phase only shows what
it added above every earlier peak; `method` says which one was used.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # lets `python benchmarks/x.py` run from a checkout that is not installed
    sys.path.insert(0, str(REPO_ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def loadavg() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: other work sharing the machine shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


LOADAVG_AT_IMPORT = loadavg()


def base_record(**fields: Any) -> Dict[str, Any]:
    """Fields every benchmark JSON carries: when, how it was invoked, on what software, how busy the host was."""
    import numpy as np

    record = {
        "date": now_iso(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "host_cpu": cpu_description(),
        "loadavg_start": LOADAVG_AT_IMPORT,
        "loadavg_end": loadavg(),
    }
    record.update(fields)
    return record


def run_cli(parse_args, run, summary, argv=None) -> Optional[Dict[str, Any]]:
    """A benchmark's main: parse, measure, write the JSON (if --out), print the one-line summary. A `run`
    that returns None (a rank other than 0 of a multi-process run) leaves both to the rank that does."""
    args = parse_args(argv)
    record = run(args)
    if record is None:
        return None
    write_json(args.out, record)
    print(summary(record), flush=True)
    return record


def median(xs: List[float]) -> float:
    return float(statistics.median(xs))


def write_json(path: Optional[str], record: Dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")


def _status_kib(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def ru_maxrss_bytes() -> int:
    """Peak RSS of this process so far (Linux reports KiB; macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next phase starts from a low RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of the phases between `start()` and `stop()`, relative to the RSS at `start()`."""

    def __init__(self) -> None:
        self.resettable = _reset_hwm()
        self.method = (
            "cpu: VmHWM - VmRSS at phase start, from /proc/self/status, high-water mark reset through "
            "/proc/self/clear_refs before each measured step (heap trimmed with malloc_trim first)"
            if self.resettable
            else "cpu: delta of resource.getrusage(RUSAGE_SELF).ru_maxrss (monotonic: a phase only shows "
            "what it added above every earlier peak)"
        )
        self._start = 0

    def start(self) -> None:
        release_host_memory()
        if self.resettable:
            _reset_hwm()
            self._start = (_status_kib("VmRSS") or 0) * 1024
        else:
            self._start = ru_maxrss_bytes()

    def stop(self) -> int:
        if self.resettable:
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = ru_maxrss_bytes()
        return max(0, peak - self._start)

    @staticmethod
    def absolute_peak() -> int:
        """Current high-water mark in bytes (since the last reset, or since start of the process)."""
        hwm = _status_kib("VmHWM")
        return hwm * 1024 if hwm is not None else ru_maxrss_bytes()
