"""Helpers for tests that run real processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

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
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "--listen", address, "--model", model,
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
