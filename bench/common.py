"""Shared helpers for the benchmarks in ``bench/``: interleaved timing, medians/percentiles, JSON with machine info.

Every benchmark writes one JSON file through :func:`write_result`, which adds a ``machine`` block (torch version,
threads, CPU model, load average, date, command line, git commit) so a number can always be traced to where and how
it was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- machine info --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else whatever :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def git_info() -> dict[str, Any]:
    """Commit of the checkout and whether it has uncommitted changes (empty where git is unavailable)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _interpreter() -> str:
    """The Python that runs, relative to the working directory when inside it (``.venv/bin/python``)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def machine_info() -> dict[str, Any]:
    """Where and how the benchmark ran."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([_interpreter(), *sys.argv]),
        "cwd": os.getcwd(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": load_average(),
        "git": git_info(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_num_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_result(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` with a ``machine`` block added (created dirs as needed).

    The load average in ``machine`` is the one at write time, i.e. just after the measurement; a benchmark that
    wants the one before it stores its own (e.g. ``payload["loadavg_before"] = load_average()``).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**payload, "machine": machine_info()}
    out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


# -- timing --------------------------------------------------------------------------------------------------------
def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time every callable once per round, round-robin over ``fns``, for ``rounds`` rounds -> ms per call by name.

    ``warmup`` untimed rounds (same round-robin) come first. The starting callable rotates from round to round, so
    no function is always the one right after another particular one (cache, frequency and scheduler effects then
    spread over all of them rather than favouring one). Slow drifts in machine load hit every function alike.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    for r in range(max(0, warmup)):
        for i in range(len(names)):
            fns[names[(i + r) % len(names)]]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t0 = time.perf_counter_ns()
            fns[name]()
            times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict[str, float]:
    """``{p50, p90, mean, min, n}`` of a list of timings (ms)."""
    if not times:
        return {"p50": math.nan, "p90": math.nan, "mean": math.nan, "min": math.nan, "n": 0}
    return {
        "p50": statistics.median(times),
        "p90": percentile(times, 90),
        "mean": statistics.fmean(times),
        "min": min(times),
        "n": len(times),
    }
