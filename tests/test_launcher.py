"""The launcher's local processes (coordinator/launcher.py) on the one harness, coordinator/local.py: a whole-model
Classify server that does not come up is one LaunchError ending with its log's last lines, as a worker's is; stopping
SIGTERMs every process at once and SIGKILLs those still there at one deadline."""

from __future__ import annotations

import sys
import time

import pytest
from moevit.coordinator.launcher import LaunchError, LocalWorkers, ensure_classify_server
from moevit.coordinator.local import free_port, health_status, log_tail, spawn, write_topology


@pytest.mark.slow  # a moe-coordinator process loading torch
def test_a_classify_server_that_fails_to_start_is_named_with_its_log(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launcher keeps the failed server's log
    ports = {"cam": free_port(), "north": free_port()}
    topo = write_topology(tmp_path, tmp_path / "missing.safetensors", ports)
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(LaunchError) as failed:
        ensure_classify_server(str(topo), "north", address, check=lambda t: health_status(address, t), startup_s=120)
    text = str(failed.value)
    assert text.startswith("Classify server for north exited with code 2: ")
    assert "moe-coordinator: error:" in text and "missing.safetensors does not exist" in text  # its log's last lines
    assert [p.name for p in tmp_path.glob("moevit-workers-*/*")] == ["north-classify.log"]  # kept: it crashed


def test_local_workers_stop_every_process_at_one_deadline():
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"
    procs = {f"p{i}": spawn([sys.executable, "-c", stubborn]) for i in range(3)}
    procs["polite"] = spawn([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    deadline = time.monotonic() + 30
    while not all(log_tail(p) == "up" for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # every process has set its signal handler
    workers = LocalWorkers(procs=dict(procs))
    t = time.monotonic()
    workers.stop(grace=1.0)
    took = time.monotonic() - t
    assert all(p.poll() is not None for p in procs.values()) and not workers.procs
    assert procs["polite"].returncode == -15 and all(procs[f"p{i}"].returncode == -9 for i in range(3))
    assert 1.0 <= took < 2.5, took  # one deadline for all, not one grace period per process
