"""Split inference end to end with real worker processes on loopback: equivalence with the in-process model,
fp16 on the wire, fast failures naming the site, degraded fallbacks, reconnection after a worker restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from moevit.coordinator.runtime import CoordinatorError, SplitRuntime
from moevit.coordinator.sites import SiteError
from moevit.deploy.topology import load_topology

import moevit
from moevit.checkpoint import model_fingerprint, save_checkpoint
from moevit.fuse import folded_copy
from tests.deploy import small_moe_model, write_topology
from tests.netutil import free_port, start_worker, start_workers, stop

LAYERS = (1, 5, 8)


# end to end through real worker/coordinator processes: make test runs it, make test-quick leaves it out
pytestmark = pytest.mark.e2e


def _model():
    return small_moe_model(LAYERS)


_topology = write_topology


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A model, a 3-site topology (cam + 2 workers; default placement), the two worker processes."""
    tmp = tmp_path_factory.mktemp("split")
    model = _model()
    path = save_checkpoint(model, tmp / "moe.safetensors")
    ports = {"cam": free_port(), "north": free_port(), "south": free_port()}
    topo = _topology(tmp, path, ports)
    procs = start_workers(str(path), {n: f"127.0.0.1:{ports[n]}" for n in ("north", "south")})
    yield {"tmp": tmp, "model": model, "path": path, "ports": ports, "topology": topo, "procs": procs}
    for p in procs.values():
        stop(p)


def _images(n, size=128, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(model, x):
    """The in-process model as the coordinator runs it: BatchNorms folded into the convolutions."""
    with torch.no_grad():
        return folded_copy(model)(x)


def test_split_logits_equal_in_process_with_fp32_wire(deployment):
    rt = SplitRuntime.from_topology(load_topology(deployment["topology"]), wire="fp32")
    try:
        rt.check_workers()
        x = _images(6)
        res = rt.classify(x)
        ref = _reference(deployment["model"], x)
        assert (res.logits - ref).abs().max() <= 1e-5
        assert not res.degraded.any()
        # the trunk runs with its BatchNorms folded; the fingerprint stays the checkpoint's, as the workers see it
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rt.model.modules())
        assert rt.fingerprint == model_fingerprint(deployment["model"])
        t = rt.traffic()
        for site in ("north", "south"):  # one RPC per site per MoE layer that routed tokens to it
            layers_used = {layer for (layer, e) in rt.context.tokens
                           if rt.placement.sites_for(layer, e) == (site,)}
            assert t[site]["calls"] == len(layers_used) >= 2
        local = rt.tokens_by_site()["cam"]
        assert local > 0 and t["north"]["tokens"] > 0 and t["south"]["tokens"] > 0
    finally:
        rt.close()


def test_fp16_wire_keeps_the_top1(deployment):
    rt = SplitRuntime.from_topology(load_topology(deployment["topology"]), wire="fp16")
    try:
        x = _images(16, seed=1)
        res = rt.classify(x)
        ref = _reference(deployment["model"], x)
        assert torch.equal(res.logits.argmax(1), ref.argmax(1))
        assert (res.logits - ref).abs().max() < 5e-2
        # fp16 halves the bytes of fp32
        sent16 = rt.traffic()["north"]["bytes_sent"]
    finally:
        rt.close()
    rt32 = SplitRuntime.from_topology(load_topology(deployment["topology"]), wire="fp32")
    try:
        rt32.classify(x)
        assert 1.9 < rt32.traffic()["north"]["bytes_sent"] / sent16 < 2.05
    finally:
        rt32.close()


def test_a_worker_of_another_model_is_refused(deployment, tmp_path):
    other = moevit.create_model("mobilevitv2_050", num_classes=5,
                                moe=moevit.MoEConfig(layers=LAYERS, num_experts=6, expert_hidden=16))
    opath = save_checkpoint(other, tmp_path / "other.safetensors")
    port = free_port()
    proc = start_worker(str(opath), f"127.0.0.1:{port}")
    try:
        ports = {**deployment["ports"], "north": port}
        rt = SplitRuntime.from_topology(load_topology(_topology(tmp_path, deployment["path"], ports)))
        with pytest.raises(CoordinatorError, match="site north .* serves model .* start the worker with the same"):
            rt.check_workers()
        rt.close()
    finally:
        stop(proc)


def test_a_dead_site_fails_fast_naming_it(deployment, tmp_path):
    ports = {**deployment["ports"], "south": free_port()}  # nothing listens there
    rt = SplitRuntime.from_topology(load_topology(_topology(tmp_path, deployment["path"], ports)), deadline_s=5)
    try:
        t0 = time.monotonic()
        with pytest.raises(SiteError, match="site south: UNAVAILABLE"):
            rt.classify(_images(2))
        assert time.monotonic() - t0 < 3
    finally:
        rt.close()


def test_local_fallback_marks_results_degraded(deployment, tmp_path):
    ports = {**deployment["ports"], "south": free_port()}
    rt = SplitRuntime.from_topology(load_topology(_topology(tmp_path, deployment["path"], ports, fallback="local")))
    try:
        x = _images(4)
        res = rt.classify(x)
        # the coordinator computed south's experts from its own copy: same numbers, but flagged
        assert (res.logits - _reference(deployment["model"], x)).abs().max() < 5e-2
        assert res.degraded.all() and res.failures and "south" in res.failures[0]
    finally:
        rt.close()


def test_skip_fallback_degrades_only_affected_images(deployment, tmp_path):
    ports = {**deployment["ports"], "south": free_port()}
    topo = load_topology(_topology(tmp_path, deployment["path"], ports, fallback="skip"))
    rt = SplitRuntime.from_topology(topo)
    try:
        res = rt.classify(_images(4))
        assert res.degraded.any() and torch.isfinite(res.logits).all()
    finally:
        rt.close()


@pytest.mark.slow
def test_a_restarted_worker_is_reconnected(deployment, tmp_path):
    path = deployment["path"]
    port = free_port()
    ports = {**deployment["ports"], "south": port}
    proc = start_worker(str(path), f"127.0.0.1:{port}")
    rt = SplitRuntime.from_topology(load_topology(_topology(tmp_path, path, ports)), wire="fp32")
    try:
        x = _images(2)
        ref = _reference(deployment["model"], x)
        assert (rt.classify(x).logits - ref).abs().max() <= 1e-5
        proc.kill()
        proc.wait()
        with pytest.raises(SiteError, match="south"):
            rt.classify(x)
        proc = start_worker(str(path), f"127.0.0.1:{port}")
        deadline = time.monotonic() + 5
        while True:
            try:
                out = rt.classify(x)
                break
            except SiteError:
                assert time.monotonic() < deadline, "not reconnected within 5 s"
                time.sleep(0.1)
        assert (out.logits - ref).abs().max() <= 1e-5
    finally:
        rt.close()
        stop(proc)


@pytest.mark.slow
def test_cli_starts_local_workers_and_reports_a_corrupt_image(tmp_path):
    from PIL import Image

    model = _model()
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    ports = {"cam": free_port(), "north": free_port(), "south": free_port()}
    topo = _topology(tmp_path, path, ports)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        Image.new("RGB", (80, 60), (40 * i, 100, 200 - 30 * i)).save(imgs / f"img{i}.jpg")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topo), "--images", str(imgs),
                        "--out", str(out), "--batch-size", "2", "--wire", "fp32"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {json.loads(line)["file"]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"broken.jpg", *(f"img{i}.jpg" for i in range(5))}
    assert "unreadable" in rows["broken.jpg"]["error"]
    assert all(rows[f"img{i}.jpg"]["label"] in "abcde" and not rows[f"img{i}.jpg"]["degraded"] for i in range(5))
    assert "5 classified (0 degraded), 1 failed" in r.stdout
    assert "north" in r.stdout and "south" in r.stdout
    # the workers it started are gone
    import socket

    for p in (ports["north"], ports["south"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0
