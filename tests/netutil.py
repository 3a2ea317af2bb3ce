"""Helpers for tests that run real processes on loopback; the harness itself is :mod:`moevit.coordinator.local`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from moevit.coordinator import local
from moevit.coordinator.local import free_port, wait_serving

__all__ = ["READY_CHANNEL_OPTIONS", "exit_clock", "free_port", "in_process_worker", "log_time", "site_client",
           "start_worker", "start_workers", "stop", "wait_serving"]

# For a loop that checks one channel until a starting process answers: reconnect every 100-500 ms. With gRPC's
# default backoff (1 s, x1.6 per failure) the channel only tried again 1-4 s after the process was serving.
READY_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                         ("grpc.max_reconnect_backoff_ms", 500)]


def start_worker(model: str, address: str, experts: str = "all", *extra: str) -> subprocess.Popen:
    """A ``moe-worker`` on ``address`` hosting ``experts`` of ``model`` with one thread, SERVING when returned (within
    120 s: 60 ran out on a machine at load 50, where a start-up takes minutes)."""
    return local.start_worker(["--listen", address, "--model", str(model), "--experts", experts, "--threads", "1",
                               *extra], address, timeout=120)


def start_workers(model: str, addresses: Mapping[str, str], experts: str = "all", *extra: str
                  ) -> dict[str, subprocess.Popen]:
    """:func:`start_worker` for every (name -> address) at once: all spawned, then each waited for, so their start-ups
    (seconds of imports each) overlap instead of adding up; all stopped again when one does not come up."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, address in addresses.items():
            procs[name] = local.spawn_worker(["--listen", address, "--model", str(model), "--experts", experts,
                                              "--threads", "1", *extra])
        deadline = time.monotonic() + 120 * len(procs)  # 120 s each, as start_worker gives one, sharing the cores
        for name, address in addresses.items():
            wait_serving(address, procs[name], timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        local.stop_processes(procs.values())
        raise
    return procs


def stop(proc: subprocess.Popen) -> None:
    local.stop_process(proc)


def exit_clock(proc: subprocess.Popen) -> Callable[[float], float]:
    """Start watching ``proc`` for its exit now. The returned function waits up to ``timeout`` s for it and returns
    the ``time.monotonic()`` at which the process exited, taken by a thread blocked on that exit: what the test does
    meanwhile (checking answers, closing its own channels) is not counted, as it is in a clock read afterwards.
    subprocess.TimeoutExpired when the process is still running after ``timeout`` s."""
    exited = threading.Event()
    at: list[float] = []

    def watch() -> None:
        proc.wait()
        at.append(time.monotonic())
        exited.set()

    threading.Thread(target=watch, daemon=True, name=f"exit-clock-{proc.pid}").start()

    def wait(timeout: float) -> float:
        if not exited.wait(timeout):
            raise subprocess.TimeoutExpired(proc.args, timeout)
        return at[0]

    return wait


def log_time(log: str, needle: str) -> float:
    """The time (seconds since the epoch) of the first line of a moevit process's ``log`` that contains ``needle``,
    from the line's own timestamp (logging's asctime, to the millisecond): when the process itself got there, which
    a loaded machine does not delay by the time the test takes to look. AssertionError when no line has it."""
    for line in log.splitlines():
        if needle in line:
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            assert stamp, f"no timestamp on {line!r}"
            return time.mktime(time.strptime(stamp[1], "%Y-%m-%d %H:%M:%S")) + int(stamp[2]) / 1000
    raise AssertionError(f"no line with {needle!r} in the log:\n{log}")


def site_client(address: str, fingerprint: str, *, wire: str = "fp32", **kw: Any):
    """The coordinator's client of one worker site (fp32 on the wire, no health watch), for transport tests."""
    from moevit.coordinator.sites import SiteClient

    return SiteClient("w", address, fingerprint=fingerprint, wire=wire, deadline_s=10.0, watch=False, **kw)


@contextlib.contextmanager
def in_process_worker(model_path: str | Path, hosted: Mapping[int, Sequence[int]],
                      alter: Callable[[Any], None] | None = None) -> Iterator[str]:
    """A WorkerServer on an event loop in a thread of this process, so a test can ``alter`` its servicer (e.g. to
    act as an older worker) before it starts; yields its address and stops it on exit."""
    from moevit.worker.backends import TorchBackend
    from moevit.worker.server import WorkerServer, load_hosted

    banks, fingerprint, _ = load_hosted(model_path, hosted)
    server = WorkerServer(TorchBackend(banks), fingerprint, arch="test")
    if alter is not None:
        alter(server._servicer)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
