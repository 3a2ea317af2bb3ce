"""A deployment on this machine: worker processes (and whole-model Classify servers) on loopback ports, started,
waited for until SERVING and stopped; free ports; topology files; small seeded MoE models.

The one harness behind ``moe-coordinator``'s local workers (:mod:`moevit.coordinator.launcher`), the emulation
(``moe-sim --emulate``), the tests that run real processes and the benchmarks. Everything here runs real
``moe-worker`` processes (``python -m moevit.worker.cli``) and real gRPC health checks; nothing is simulated.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import moevit

__all__ = [
    "DEVICE",
    "LaunchError",
    "coordinator_command",
    "free_port",
    "replicated_placement",
    "small_moe_model",
    "spawn",
    "spawn_worker",
    "start_worker",
    "stop_process",
    "stop_processes",
    "wait_serving",
    "worker_command",
    "write_topology",
]

# A Raspberry-Pi-class device: what the topologies written here give every site.
DEVICE = {"gflops": 5, "memory_mb": 256, "active_w": 3, "idle_w": 1}


class LaunchError(RuntimeError):
    """A local worker did not come up; the message names the site or address and ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS's pick; another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_command(*args: str) -> list[str]:
    """The ``moe-worker`` command line with ``args``, run by this interpreter."""
    return [sys.executable, "-m", "moevit.worker.cli", *args]


def coordinator_command(*args: str) -> list[str]:
    """The ``moe-coordinator`` command line with ``args``, run by this interpreter (e.g. a whole-model Classify
    server: ``--serve ADDR --as-site SITE --strategy local``)."""
    return [sys.executable, "-m", "moevit.coordinator.cli", *args]


def spawn_worker(args: Sequence[str], *, log: str | os.PathLike[str] | IO[bytes] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """Start ``moe-worker args`` without waiting (see :func:`spawn`)."""
    return spawn(worker_command(*args), log=log, env=env, cwd=cwd)


def spawn(command: Sequence[str], *, log: str | os.PathLike[str] | IO[bytes] | None = None,
          env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """Start ``command`` (:func:`worker_command`, :func:`coordinator_command`) without waiting. Its stdout and
    stderr go to ``log`` (a path or an open binary file; None: an anonymous temporary file, never a pipe nobody
    reads, which would block a chatty process once it filled). OpenMP waits passively: a process sharing cores
    with the coordinator must not spin between calls."""
    if log is None:
        out: Any = tempfile.TemporaryFile()
    elif isinstance(log, (str, os.PathLike)):
        out = open(log, "w+b")  # the child holds it from here on; readable, for log_tail()
    else:
        out = log
    proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}, cwd=cwd)
    proc.log = out  # type: ignore[attr-defined]  # for log_tail() when it fails
    return proc


def log_tail(proc: subprocess.Popen, lines: int = 20) -> str:
    """The last ``lines`` of a process's log as :func:`spawn_worker` set it up ('' when there is none)."""
    out = getattr(proc, "log", None)
    if out is None:
        return ""
    try:
        out.flush()
        fd = out.fileno()
        # pread: the child shares this file's offset, which a seek here would move under its writes
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
    except (OSError, ValueError):
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def health_status(address: str, timeout: float = 0.5) -> str:
    """The gRPC health status of ``address`` over plaintext ('SERVING', 'NOT_SERVING', ...), 'UNREACHABLE'."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moevit_rpc.channels import plain_channel_options

    with grpc.insecure_channel(address, options=plain_channel_options()) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, *,
                 check: Callable[[], str] | None = None, what: str | None = None) -> None:
    """Wait until ``address`` answers SERVING. ``check`` asks the status another way (a SiteClient with TLS and a
    token); by default a plaintext health check. LaunchError when ``proc`` exits first or after ``timeout`` s: one
    line naming ``what`` (default: the worker at ``address``) and ending with the last lines of its log."""
    check = check or (lambda: health_status(address))
    what = what or f"worker at {address}"
    deadline = time.monotonic() + timeout
    while check() != "SERVING":
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what} exited with code {proc.returncode}" + _tail(proc))
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not SERVING after {timeout:.0f} s" + (_tail(proc) if proc else ""))
        time.sleep(0.1)


def _tail(proc: subprocess.Popen) -> str:
    tail = " | ".join(log_tail(proc, 3).splitlines())
    return f": {tail}" if tail else ""


def start_worker(args: Sequence[str], address: str, *, log: str | os.PathLike[str] | IO[bytes] | None = None,
                 timeout: float = 120.0, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """:func:`spawn_worker` then :func:`wait_serving` on ``address`` (which ``args`` must make it listen on); the
    process is stopped again when it does not come up."""
    proc = spawn_worker(args, log=log, env=env, cwd=cwd)
    try:
        wait_serving(address, proc, timeout)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
    return stop_processes([proc], timeout)[0]


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> list[int]:
    """SIGTERM to every process still running, all at once, then SIGKILL to those not gone ``timeout`` s later
    (one deadline for all); returns their exit codes."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def write_topology(tmp: str | os.PathLike[str], model_path: str | os.PathLike[str] | None, ports: Mapping[str, int],
                   fallback: str = "fail", name: str = "sites.yaml", *, coordinator: str = "cam",
                   addresses: Mapping[str, str] | None = None,
                   placement: Mapping[int, Mapping[str, list[int]]] | str | None = None,
                   rpc: Mapping[str, Any] | None = None, site_extra: Mapping[str, Mapping[str, Any]] | None = None,
                   bandwidth_mbps: float = 20, latency_ms: float = 4) -> Path:
    """A topology of sites on 127.0.0.1 (``addresses`` overrides a site's address, e.g. a proxy in front of it),
    one link from the coordinator to each other site; written to ``tmp/name``."""
    import yaml

    addresses = addresses or {}
    doc: dict[str, Any] = {"model": None if model_path is None else str(model_path), "coordinator": coordinator,
                           "fallback": fallback,
                           "sites": {n: {"address": addresses.get(n, f"127.0.0.1:{p}"), "device": dict(DEVICE),
                                         **(site_extra or {}).get(n, {})} for n, p in ports.items()},
                           "links": [{"between": [coordinator, n], "bandwidth_mbps": bandwidth_mbps,
                                      "latency_ms": latency_ms} for n in ports if n != coordinator]}
    if model_path is None:
        del doc["model"]
    if placement is not None:
        doc["placement"] = placement if isinstance(placement, str) else {k: dict(v) for k, v in placement.items()}
    if rpc is not None:
        doc["rpc"] = dict(rpc)
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def replicated_placement(layers: Mapping[int, int], sites: tuple[str, ...] = ("w0", "w1", "w2")
                         ) -> dict[int, dict[str, list[int]]]:
    """Expert e of every MoE layer (layer -> expert count) on sites[e mod n] and sites[(e+1) mod n]: two replicas."""
    n = len(sites)
    out: dict[int, dict[str, list[int]]] = {}
    for layer, count in layers.items():
        held: dict[str, list[int]] = {s: [] for s in sites}
        for e in range(count):
            held[sites[e % n]].append(e)
            held[sites[(e + 1) % n]].append(e)
        out[layer] = held
    return out


def small_moe_model(layers: tuple[int, ...] = (1, 5, 8), *, num_experts: int = 6, expert_hidden: int = 16,
                    num_classes: int = 5, labels: tuple[str, ...] | None = None, image_size: int | None = None,
                    calib_size: int = 128, correction: bool = True, seed: int = 0) -> moevit.MobileViTV2:
    """A random ``mobilevitv2_050`` with MoE layers whose routers spread patches over every expert (scalers and
    centroids from real patches of random images) and, with ``correction``, non-zero correction terms."""
    import torch

    import moevit
    from moevit.convert import capture_pre_mlp

    torch.manual_seed(seed)
    labels = tuple(labels) if labels is not None else tuple(chr(97 + i) for i in range(num_classes))
    moe = moevit.MoEConfig(layers=layers, num_experts=num_experts, expert_hidden=expert_hidden)
    extra = {} if image_size is None else {"image_size": image_size}
    m = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=num_classes, labels=labels,
                                              moe=moe, **extra)).eval()
    calib = torch.randn(8, 3, calib_size, calib_size, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        for i, layer in m.moe_layers().items():
            zbar = capture_pre_mlp(m, i, calib).mean(dim=2).reshape(-1, layer.router.dim)
            lo, hi = zbar.min(0).values, zbar.max(0).values
            layer.router.scale_min.copy_(lo)
            layer.router.scale_max.copy_(hi)
            pick = torch.randperm(len(zbar), generator=torch.Generator().manual_seed(i))[: layer.num_experts]
            layer.router.centroids.copy_((zbar[pick] - lo) / (hi - lo))
            if correction:
                layer.experts.correction.normal_(0, 0.1)
    return m
