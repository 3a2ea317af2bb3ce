"""Helpers for tests that run real processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


def start_worker(model: str, address: str, experts: str = "all", *extra: str) -> subprocess.Popen:
    # stderr to an unnamed file, not a pipe nobody reads: a chatty worker would block once the pipe filled
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moevit.worker.cli", "--listen", address, "--model", model,
                             "--experts", experts, "--threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_serving(address, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        log.seek(0)
        raise RuntimeError(f"{e}; worker log:\n{log.read().decode(errors='replace')[-2000:]}") from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
