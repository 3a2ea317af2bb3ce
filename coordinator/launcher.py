"""The one-machine default: for a loopback site where nothing answers, start a local worker process (or, for
offload-image, the site's whole-model Classify server), and stop it on exit. Lets ``moe-coordinator --topology
examples/sites.yaml`` run the whole distributed system on one machine. The processes are started, waited for and
stopped by :mod:`moevit.coordinator.local`, the harness the tests and benchmarks use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moevit.coordinator.local import (
    LaunchError,
    coordinator_command,
    spawn,
    spawn_worker,
    stop_processes,
    wait_serving,
)
from moevit.coordinator.sites import SiteClient

from moevit_rpc.channels import is_loopback

__all__ = ["LaunchError", "LocalWorkers", "ensure_classify_server", "ensure_workers"]


@dataclass
class LocalWorkers:
    """Worker processes this coordinator started; :meth:`stop` ends them (SIGTERM, then SIGKILL)."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    logdir: Path | None = None  # removed by stop() unless a worker had ended on its own (then kept and named)

    def stop(self, grace: float = 5.0) -> None:
        # a worker that ended before it was asked to is the one whose log a user needs; one slow to exit is not
        crashed = any(p.poll() not in (None, 0) for p in self.procs.values())
        stop_processes(self.procs.values(), grace)
        self.procs.clear()
        if self.logdir is not None:
            if not crashed:
                shutil.rmtree(self.logdir, ignore_errors=True)
            else:
                print(f"moe-coordinator: worker logs kept in {self.logdir}", file=sys.stderr)
            self.logdir = None


def ensure_workers(topology_path: str, clients: dict[str, SiteClient], *, model: str | None = None,
                   threads: int = 1, backend: str = "torch", startup_s: float = 120.0,
                   log=lambda s: None) -> LocalWorkers:
    """Start a worker for every loopback site in ``clients`` that does not answer; wait until all are SERVING."""
    logdir = Path(tempfile.mkdtemp(prefix="moevit-workers-"))
    started = LocalWorkers(logdir=logdir)
    try:
        for name, client in clients.items():
            host = client.address.rsplit(":", 1)[0]
            if client.health(timeout=0.5) != "UNREACHABLE" or not is_loopback(host):
                continue
            args = ["--topology", topology_path, "--site", name, "--threads", str(threads), "--backend", backend]
            if model:
                args += ["--model", model]
            logf = logdir / f"{name}.log"
            started.logs[name] = logf
            started.procs[name] = spawn_worker(args, log=logf)
            log(f"started a local worker for {name} at {client.address} (log {logf})")
        deadline = time.monotonic() + startup_s
        for name, proc in started.procs.items():
            wait_serving(clients[name].address, proc, max(0.0, deadline - time.monotonic()),
                         check=lambda c=clients[name]: c.health(timeout=0.5), what=f"local worker for {name}")
    except BaseException:
        started.stop()
        raise
    return started


def ensure_classify_server(topology_path: str, site: str, address: str, *, check, model: str | None = None,
                           threads: int = 1, startup_s: float = 120.0, log=lambda s: None) -> LocalWorkers:
    """For offload-image: when nothing answers at ``address`` (loopback), start ``moe-coordinator --serve address
    --as-site site --strategy local`` (the whole model's Classify, as that site) and wait until it is SERVING.
    ``check(timeout)`` asks its health the way the camera will call it (TLS, token)."""
    started = LocalWorkers(logdir=Path(tempfile.mkdtemp(prefix="moevit-workers-")))
    host = address.rsplit(":", 1)[0].strip("[]")
    if check(0.5) != "UNREACHABLE" or not is_loopback(host):
        return started
    try:
        args = ["--topology", topology_path, "--serve", address, "--as-site", site, "--strategy", "local",
                "--no-spawn", "--threads", str(threads)]
        if model:
            args += ["--model", model]
        logf = started.logdir / f"{site}-classify.log"
        started.logs[site] = logf
        started.procs[site] = spawn(coordinator_command(*args), log=logf)
        log(f"started the whole model's Classify server for {site} at {address} (log {logf})")
        wait_serving(address, started.procs[site], startup_s, check=lambda: check(0.5),
                     what=f"Classify server for {site}")
    except BaseException:
        started.stop()
        raise
    return started
