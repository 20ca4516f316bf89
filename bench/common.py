"""Shared benchmark plumbing: machine facts, child processes with peak RSS, report."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "bench" / "RESULTS.md"  # the raw log; BENCHMARKS.md is curated from it


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        mem_kb = 0
    vers = []
    for pkg in ("tensorflow", "keras", "scikit-learn", "h5py", "numpy", "pillow"):
        try:
            vers.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB RAM; "
            f"Python {platform.python_version()}; " + ", ".join(vers))


# The child's own peak, printed as it exits. The kernel's ru_maxrss of a child is no
# good here: it keeps the high-water mark of the parent's memory the child was forked
# with, so a benchmark whose parent held 600 MB saw every child peak at >= 600 MB.
PEAK_RSS = """
import atexit as _atexit
def _peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print('{"_vmhwm_kb": %s}' % line.split()[1], flush=True)
_atexit.register(_peak_rss)
"""


def run_child(code: str, *args: str) -> dict:
    """Run Python `code` in a fresh process; it prints one JSON line. Adds peak RSS and wall."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS + code, *args],
                            stdout=subprocess.PIPE,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                 "PYTHONPATH": str(REPO)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed ({status}): {code[:80]}")
    lines = out.decode().strip().splitlines()
    peak_kb = usage.ru_maxrss  # an upper bound, if the child left without running atexit
    if lines and lines[-1].startswith('{"_vmhwm_kb"'):
        peak_kb = json.loads(lines.pop())["_vmhwm_kb"]
    result = json.loads(lines[-1])
    result.update(peak_rss_mb=round(peak_kb / 1024, 1), wall_s=round(wall, 2))
    return result


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, body: str) -> None:
    """Print a section and append it to bench/RESULTS.md with machine and command."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    section = (f"\n## {title}\n\n{time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {machine()}.\n\n"
               f"Command: `{command}`\n\n{body}\n")
    print(section)
    with open(REPORT, "a") as f:
        f.write(section)
