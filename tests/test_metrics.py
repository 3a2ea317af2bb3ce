"""Prometheus metrics of the coordinator and the workers: scraped over HTTP after real RPCs to a real worker."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import yaml
from moevit.coordinator.metrics import CoordinatorMetrics
from moevit.coordinator.runtime import SplitRuntime
from moevit.coordinator.sites import SiteClient, SiteError
from moevit.coordinator.stream import ExpertStream
from moevit.deploy.topology import load_topology
from prometheus_client.parser import text_string_to_metric_families

import moevit
from moevit.checkpoint import save_checkpoint
from moevit_rpc.metrics import parse_listen
from tests.netutil import free_port, stop, wait_serving


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x
                                                                          for k, x in labels.items()))


def test_parse_listen():
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen(9100) == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    with pytest.raises(ValueError, match="expected PORT or HOST:PORT"):
        parse_listen("localhost:http")
    with pytest.raises(ValueError, match="out of range"):
        parse_listen("70000")


def _topology(tmp, model, ports, fallback="fail", name="sites.yaml"):
    doc = {"model": str(model), "coordinator": "cam", "fallback": fallback,
           "sites": {n: {"address": f"127.0.0.1:{p}", "device": {"gflops": 5, "memory_mb": 256, "active_w": 3,
                                                                    "idle_w": 1}} for n, p in ports.items()},
           "links": [{"between": ["cam", "north"], "bandwidth_mbps": 20, "latency_ms": 4}]}
    (tmp / name).write_text(yaml.safe_dump(doc))
    return load_topology(tmp / name)


@pytest.mark.slow
def test_coordinator_and_worker_metrics(tmp_path):
    torch.manual_seed(0)
    model = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=3, image_size=64,
                                                  moe=moevit.MoEConfig(layers=(5, 8), num_experts=4,
                                                                       expert_hidden=8)))
    path = save_checkpoint(model.eval(), tmp_path / "moe.safetensors")
    ports = {"cam": free_port(), "north": free_port()}
    wport = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "moevit.worker.cli", "--listen", f"127.0.0.1:{ports['north']}",
                               "--model", str(path), "--experts", "all", "--threads", "1", "--site", "north",
                               "--metrics-port", str(wport)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rt = None
    try:
        wait_serving(f"127.0.0.1:{ports['north']}", proc=worker)
        rt = SplitRuntime.from_topology(_topology(tmp_path, path, ports), wire="fp32")
        metrics = CoordinatorMetrics()
        metrics.instrument(rt)
        _, cport = metrics.serve("127.0.0.1:0")
        rt.check_workers()
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        rt.classify(x)
        rt.classify(x[:2])
        t = rt.traffic()["north"]
        assert t["calls"] > 0
        c = scrape(cport)
        assert total(c, "moevit_coordinator_requests_total", outcome="ok") == 2
        assert total(c, "moevit_coordinator_images_total", outcome="ok") == 5
        assert total(c, "moevit_coordinator_request_seconds_count") == 2
        assert total(c, "moevit_coordinator_site_rpcs_total", site="north") == t["calls"]
        assert total(c, "moevit_coordinator_site_sent_bytes_total", site="north") == t["bytes_sent"]
        assert total(c, "moevit_coordinator_site_received_bytes_total", site="north") == t["bytes_received"]
        assert total(c, "moevit_coordinator_site_rpc_seconds_count", site="north") == t["calls"]
        assert total(c, "moevit_coordinator_expert_tokens_total") == sum(rt.context.tokens.values())
        assert total(c, "moevit_coordinator_expert_tokens_total", site="north") == t["tokens"]
        assert total(c, "moevit_coordinator_site_up", site="north") == 1

        # the worker counts the same calls, bytes and tokens from its side
        w = scrape(wport)
        assert total(w, "moevit_worker_requests_total", method="RunExperts", code="OK") == t["calls"]
        assert total(w, "moevit_worker_received_bytes_total") == t["bytes_sent"]
        assert total(w, "moevit_worker_sent_bytes_total") == t["bytes_received"]
        assert total(w, "moevit_worker_expert_tokens_total") == t["tokens"]
        assert total(w, "moevit_worker_request_seconds_count", method="RunExperts") == t["calls"]
        assert total(w, "moevit_worker_up") == 1
        assert total(w, "moevit_worker_info", site="north", fingerprint=rt.fingerprint) == 1
        # a refused request is counted with its status code: refused from its headers when it comes on a stream
        # (the whole stream is refused: counted as a RunExpertsStream call), as a RunExperts request otherwise
        # The refusal can end the new stream before its first request is submitted (it did on CI): that is the
        # request's answer, not a reason for a second stream and a unary call (3 refusals counted). Made certain
        # here by waiting for each new stream to end before anything is submitted on it.
        opened = ExpertStream.__init__

        def opened_and_refused(self, *args, **kwargs) -> None:
            opened(self, *args, **kwargs)
            t_end = time.monotonic() + 5
            while not self.ended and time.monotonic() < t_end:
                time.sleep(0.01)

        bad = SiteClient("north", f"127.0.0.1:{ports['north']}", fingerprint="not-this-model")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ExpertStream, "__init__", opened_and_refused)
            with pytest.raises(SiteError, match="FAILED_PRECONDITION"):
                bad.start(8, [(0, torch.zeros(2, model.moe_layers()[8].router.dim))]).result()
        bad.close()
        # the worker counts a call once its handler has returned, which can be just after the client saw the status
        t_end = time.monotonic() + 5

        def refused() -> float:
            w = scrape(wport)
            return sum(total(w, "moevit_worker_requests_total", method=m, code="FAILED_PRECONDITION")
                       for m in ("RunExperts", "RunExpertsStream"))

        while refused() == 0 and time.monotonic() < t_end:
            time.sleep(0.05)
        time.sleep(0.5)  # (a second count would show by now)
        assert refused() == 1

        # degraded results (a dead site, fallback local) and failed requests (fallback fail)
        dead = {"cam": ports["cam"], "north": free_port()}
        rt_local = SplitRuntime.from_topology(_topology(tmp_path, path, dead, "local", "local.yaml"))
        m_local = CoordinatorMetrics()
        m_local.instrument(rt_local)
        res = rt_local.classify(x)
        _, lport = m_local.serve(0)
        d = scrape(lport)
        assert res.degraded.any()
        assert total(d, "moevit_coordinator_degraded_images_total") == int(res.degraded.sum())
        assert total(d, "moevit_coordinator_requests_total", outcome="degraded") == 1
        assert total(d, "moevit_coordinator_site_up", site="north") == 0
        # the health watch knows the site is down, so no call is wasted on it: the failure is named, not an RPC
        assert any("north" in f for f in res.failures)
        rt_local.close()

        stop(worker)
        with pytest.raises(SiteError):
            rt.classify(x)
        c = scrape(cport)
        assert total(c, "moevit_coordinator_requests_total", outcome="failed") == 1
        assert total(c, "moevit_coordinator_images_total", outcome="failed") == 3
        assert total(c, "moevit_coordinator_site_up", site="north") == 0
    finally:
        if rt is not None:
            rt.close()
        stop(worker)


def test_worker_refuses_a_bad_metrics_address(tmp_path, capsys):
    from moevit.worker.cli import main

    model = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=3,
                                                  moe=moevit.MoEConfig(layers=(8,), num_experts=2, expert_hidden=8)))
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert main(["--listen", "127.0.0.1:0", "--model", str(path), "--experts", "all", "--metrics-port",
                 "host:port"]) == 2
    assert "--metrics-port 'host:port'" in capsys.readouterr().err
