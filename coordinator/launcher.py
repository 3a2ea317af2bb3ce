"""The one-machine default: for a loopback site where nothing answers, start a local worker process, and stop it
on exit. Lets ``moe-coordinator --topology examples/sites.yaml`` run the whole distributed system on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moevit.coordinator.sites import SiteClient

from moevit_rpc.channels import is_loopback


class LaunchError(RuntimeError):
    """A local worker did not come up; the message names the site and ends with its log."""


@dataclass
class LocalWorkers:
    """Worker processes this coordinator started; :meth:`stop` ends them (SIGTERM, then SIGKILL)."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def stop(self, grace: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def ensure_workers(topology_path: str, clients: dict[str, SiteClient], *, model: str | None = None,
                   threads: int = 1, backend: str = "torch", startup_s: float = 120.0,
                   log=lambda s: None) -> LocalWorkers:
    """Start a worker for every loopback site in ``clients`` that does not answer; wait until all are SERVING."""
    started = LocalWorkers()
    logdir = Path(tempfile.mkdtemp(prefix="moevit-workers-"))
    try:
        for name, client in clients.items():
            host = client.address.rsplit(":", 1)[0]
            if client.health(timeout=0.5) != "UNREACHABLE" or not is_loopback(host):
                continue
            cmd = [sys.executable, "-m", "moevit.worker.cli", "--topology", topology_path, "--site", name,
                   "--threads", str(threads), "--backend", backend]
            if model:
                cmd += ["--model", model]
            logf = logdir / f"{name}.log"
            started.logs[name] = logf
            # passive OpenMP waiting: a worker sharing cores with the coordinator must not spin between calls
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            started.procs[name] = subprocess.Popen(cmd, stdout=logf.open("w"), stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=env)
            log(f"started a local worker for {name} at {client.address} (log {logf})")
        deadline = time.monotonic() + startup_s
        for name, proc in started.procs.items():
            while clients[name].health(timeout=0.5) != "SERVING":
                if proc.poll() is not None:
                    tail = started.logs[name].read_text().strip().splitlines()[-3:]
                    raise LaunchError(f"local worker for {name} exited with code {proc.returncode}: "
                                      + " | ".join(tail))
                if time.monotonic() > deadline:
                    raise LaunchError(f"local worker for {name} not SERVING after {startup_s:.0f} s "
                                      f"(log {started.logs[name]})")
                time.sleep(0.1)
    except BaseException:
        started.stop()
        raise
    return started
