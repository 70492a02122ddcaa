"""What every benchmark records besides its own figures, written once for all of them.

A run's record (`Run`): which benchmark, quick or full, the command, when it started, the
machine (`machine_info`) with its load at the start and the end, and the CPU time other
processes took meanwhile (`CpuMeter`), then the JSON file and the closing `wrote ... in N s`.
Also the statistics and the torch set-up the benchmarks share: `summary_ms`, `quantile`,
`torch_threads`.

The scripts run as `python benchmarks/NAME.py`, so this directory is `sys.path[0]` and they
`import _results`. Not `from benchmarks import ...`: Opacus installs a top-level package
named `benchmarks` that would shadow this one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
import transformers

OTHER_CPU_WARNING = 0.05  # share of all cores taken by other processes above which a summary warns


# -- the record of one run ----------------------------------------------------------------------


class Run:
    """One run of a benchmark: its JSON record from the header to the file.

    `result` starts with the header (benchmark, mode, command, started_at, machine); the
    script adds its own keys, then `finish` stamps the end and writes the file."""

    def __init__(self, benchmark: str, *, quick: bool, machine: dict[str, Any]) -> None:
        self._began = time.perf_counter()
        self._meter = CpuMeter()
        self._out: Path | None = None
        self.result: dict[str, Any] = {
            "benchmark": benchmark,
            "mode": "quick" if quick else "full",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine,
        }

    def finish(self, out: Path, *, record_output: bool = True) -> None:
        """Stamp the end (the load, other processes' CPU time, the duration) and write the
        record to `out`, naming it under "output" unless `record_output` is false."""
        self.result["machine"]["loadavg_at_end"] = loadavg()
        self.result["machine"]["cpu_during_run"] = self._meter.report()
        self.result["duration_s"] = round(time.perf_counter() - self._began, 1)
        if record_output:
            self.result["output"] = str(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.result, indent=2) + "\n")
        self._out = out

    def print_written(self) -> None:
        """The last line of every benchmark's output: where the record went, and how long the run took."""
        if self._out is None:
            raise RuntimeError("print_written before finish: nothing has been written yet")
        print(f"wrote {self._out} in {self.result['duration_s']:.0f} s")


def warn_if_loaded(machine: dict[str, Any], advice: str) -> None:
    """Print a warning when other processes took more than OTHER_CPU_WARNING of the CPU
    during the run; `advice` completes the sentence (it starts with its own punctuation)."""
    other = machine["cpu_during_run"]["other_cpu_share"]
    if other is not None and other > OTHER_CPU_WARNING:
        print(f"WARNING: other processes used {other:.0%} of the CPU during the run{advice}")


# -- the machine --------------------------------------------------------------------------------


def machine_info(**versions: str) -> dict[str, Any]:
    """Cores, CPU, Python, the `versions` of the libraries given, the OS, and the load now."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu": cpu_model or platform.processor(),
        "python": platform.python_version(),
        **versions,
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
    }


def torch_stack() -> dict[str, str]:
    """The versions of what the swarm runs on, for `machine_info(**torch_stack())`."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "grpcio": grpc.__version__}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuMeter:
    """CPU time the rest of the machine used while this benchmark ran: busy time from
    /proc/stat minus this process's and its reaped children's (the servers). On a shared
    machine, a large share means the figures carry other people's load."""

    def __init__(self) -> None:
        self._busy0 = _busy_seconds()
        self._own0 = _own_seconds()
        self._wall0 = time.perf_counter()

    def report(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self._wall0
        busy = _busy_seconds()
        own = _own_seconds() - self._own0
        if busy is None or self._busy0 is None:
            return {"own_cpu_s": round(own, 1), "other_cpu_s": None, "other_cpu_share": None}
        other = max(0.0, busy - self._busy0 - own)
        return {
            "own_cpu_s": round(own, 1),
            "other_cpu_s": round(other, 1),
            "other_cpu_share": round(other / (wall * (os.cpu_count() or 1)), 3),
        }


def _busy_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- statistics and set-up ----------------------------------------------------------------------


def summary_ms(seconds: Sequence[float], *, tail: float = 0.9, digits: int = 4) -> dict[str, float | int]:
    """p50 / p<tail> / mean / min / max in milliseconds of a list of durations in seconds,
    rounded to `digits` decimals (the tail key is named after it: p90 by default, p95)."""
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50": round(quantile(ms, 0.5), digits),
        f"p{round(tail * 100)}": round(quantile(ms, tail), digits),
        "mean": round(statistics.fmean(ms), digits),
        "min": round(ms[0], digits),
        "max": round(ms[-1], digits),
        "n": len(ms),
    }


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads in this process, then restore the number before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of processes `pids` so far (/proc/<pid>/stat, clock-tick resolution)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")
