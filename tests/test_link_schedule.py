"""Link schedules (issue 19, item 4): the sweep's ``settings.link_schedule`` is read strictly (one-line errors naming
the key), the simulator applies a step to the links it names only, with its energy per bit, and the link proxy
changes its rate mid-run on its own clock, measured on real sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from moevit.deploy.topology import Placement, parse_topology
from moevit.partition.costmodel import parse_stats, synthetic_stats
from moevit.sim.config import ConfigError, LinkStep, Settings, check_sites, expand, parse_sweep
from moevit.sim.engine import World, run_scenario
from moevit.sim.linkproxy import ThreadedLinkProxy


def _sweep(steps, **extra):
    return parse_sweep({"settings": {"link_schedule": steps}, **extra}, "sweep.yaml")


def test_the_long_adaptive_sweep_is_the_short_one_with_phases_twice_as_long():
    """examples/sweep-adaptive-long.yaml (bench_adaptive_emulated.py --sweep) must stay the same scenario as
    examples/sweep-adaptive.yaml, its phases twice as long: same steps, twice the images and start times."""
    import dataclasses

    import yaml
    from moevit.deploy.topology import load_topology

    short, long = (parse_sweep(yaml.safe_load(open(f"examples/{n}.yaml")), n)
                   for n in ("sweep-adaptive", "sweep-adaptive-long"))
    check_sites(long, {"sites-adaptive": load_topology("examples/sites-adaptive.yaml")})
    assert long.images == 2 * short.images and long.arrivals == short.arrivals
    assert long.strategies == short.strategies
    assert [dataclasses.replace(st, from_s=st.from_s / 2) for st in long.settings.link_schedule] == \
        list(short.settings.link_schedule)


def test_schedule_steps_parse_with_sites_and_energy_per_bit():
    s = _sweep([{"from_s": 0, "bandwidth_mbps": 5, "latency_ms": 4},
                {"from_s": 30, "sites": ["hut"], "bandwidth_mbps": 0.25, "latency_ms": 20, "tx_nj_per_bit": 2400},
                {"from_s": 30, "sites": ["relay"], "bandwidth_mbps": 1, "latency_ms": 3}])
    steps = s.settings.link_schedule
    assert steps[1] == LinkStep(30.0, 0.25, 20.0, ("hut",), 2400.0, None)
    assert [st.from_s for st in s.settings.schedule_for("hut")] == [0.0, 30.0]
    assert s.settings.schedule_for("relay")[-1].bandwidth_mbps == 1.0
    # the older form, a (from_s, bandwidth_mbps, latency_ms) tuple, is a step for every link
    assert Settings(link_schedule=((1.0, 2.0, 3.0),)).link_schedule == (LinkStep(1.0, 2.0, 3.0),)


@pytest.mark.parametrize("steps,key,words", [
    ([{"from_s": 0, "bandwidht_mbps": 5, "latency_ms": 4}], "settings.link_schedule[0].bandwidht_mbps",
     "did you mean 'bandwidth_mbps'"),
    ([{"from_s": 0, "latency_ms": 4}], "settings.link_schedule[0].bandwidth_mbps", "missing"),
    ([{"from_s": 0, "bandwidth_mbps": 0, "latency_ms": 4}], "settings.link_schedule[0].bandwidth_mbps", "> 0"),
    ([{"from_s": 0, "bandwidth_mbps": 1, "latency_ms": -1}], "settings.link_schedule[0].latency_ms", ">= 0"),
    ([{"from_s": 9, "bandwidth_mbps": 1, "latency_ms": 1}, {"from_s": 3, "bandwidth_mbps": 1, "latency_ms": 1}],
     "settings.link_schedule[1].from_s", "ascending"),
    ([{"from_s": 3, "bandwidth_mbps": 1, "latency_ms": 1},
      {"from_s": 3, "sites": ["hut"], "bandwidth_mbps": 2, "latency_ms": 1}],
     "settings.link_schedule[1].from_s", "two steps for one link"),
    ([{"from_s": 0, "sites": ["hut", "hut"], "bandwidth_mbps": 1, "latency_ms": 1}],
     "settings.link_schedule[0].sites", "twice"),
    ([{"from_s": 0, "bandwidth_mbps": 1, "latency_ms": 1, "tx_nj_per_bit": "lots"}],
     "settings.link_schedule[0].tx_nj_per_bit", "expected a number"),
    ("often", "settings.link_schedule", "non-empty list"),
])
def test_bad_schedules_are_one_line_errors_naming_the_key(steps, key, words):
    with pytest.raises(ConfigError) as e:
        _sweep(steps)
    assert e.value.key_path == key and words in str(e.value) and "\n" not in str(e.value)


def _topology():
    return parse_topology({
        "coordinator": "cam", "fallback": "fail",
        "sites": {"cam": {"address": "10.0.0.1:1", "device": {"gflops": 2, "memory_mb": 512, "active_w": 1.0,
                                                              "idle_w": 0.1}},
                  "relay": {"address": "10.0.0.2:1", "device": {"gflops": 2, "memory_mb": 1, "active_w": 1.0,
                                                                "idle_w": 0.1}},
                  "hut": {"address": "10.0.0.3:1", "device": {"gflops": 20, "memory_mb": 2048, "active_w": 4.0,
                                                              "idle_w": 1.0}}},
        "links": [{"between": ["cam", "relay"], "bandwidth_mbps": 2, "latency_ms": 3},
                  {"between": ["cam", "hut"], "bandwidth_mbps": 5, "latency_ms": 4, "tx_nj_per_bit": 120,
                   "rx_nj_per_bit": 60}]}, "<t>")


def test_unknown_site_in_a_step_names_the_key():
    with pytest.raises(ConfigError) as e:
        check_sites(_sweep([{"from_s": 1, "sites": ["hutt"], "bandwidth_mbps": 1, "latency_ms": 1}]),
                    {"base": _topology()})
    assert e.value.key_path == "settings.link_schedule[0].sites[0]" and "did you mean 'hut'" in str(e.value)


def test_a_step_changes_only_its_links_and_their_energy_per_bit():
    topo = _topology()
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=4, num_classes=3, image_size=64, seed=0), "<s>")
    placement = Placement({(layer, e): ("relay",) for layer in (1, 5, 8) for e in range(4)})
    world = World(topologies={"t": topo}, placements={"t": placement}, stats=stats)
    sweep = parse_sweep({"strategies": ["split", "offload-image"], "images": 20,
                         "arrivals": [{"kind": "periodic", "interval_s": 1}],
                         "settings": {"link_schedule": [{"from_s": 10, "sites": ["hut"], "bandwidth_mbps": 0.25,
                                                         "latency_ms": 20, "tx_nj_per_bit": 2400,
                                                         "rx_nj_per_bit": 1200}]}}, "sweep.yaml")
    res = {sc.strategy: run_scenario(world, sc) for sc in expand(sweep, ["t"])}
    off, split = res["offload-image"], res["split"]
    before = [v for t, v in zip(off.arrivals_s, off.latencies_s, strict=True) if t < 10]
    after = [v for t, v in zip(off.arrivals_s, off.latencies_s, strict=True) if t >= 10]
    assert min(after) > 5 * max(before)  # the hut's link fell 20-fold
    assert max(split.latencies_s) == pytest.approx(min(split.latencies_s), rel=1e-6)  # the relay's link did not
    cam_before = [v for t, v in zip(off.arrivals_s, off.image_camera_j, strict=True) if t < 10]
    cam_after = [v for t, v in zip(off.arrivals_s, off.image_camera_j, strict=True) if t >= 10]
    assert min(cam_after) == pytest.approx(20 * max(cam_before), rel=0.05)  # 2400 vs 120 nJ per bit sent


def _sink() -> tuple[socket.socket, str]:
    """A TCP server that reads everything and answers one byte per 4 KiB received."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                got = 0
                while data := conn.recv(65536):
                    got += len(data)
                    while got >= 4096:
                        got -= 4096
                        conn.sendall(b"k")
        except OSError:  # the test closed the server or the connection first
            pass

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def _send_4k(c: socket.socket) -> float:
    t0 = time.perf_counter()
    c.sendall(b"x" * 4096)
    assert c.recv(1) == b"k"
    return time.perf_counter() - t0


def test_the_proxy_changes_its_rate_mid_run_on_its_own_clock():
    srv, target = _sink()
    with ThreadedLinkProxy(target) as proxy:
        start = time.monotonic()
        # unshaped, then 0.1 Mbit/s (4 KiB takes 328 ms) from 0.6 s on, then unshaped again from 1.4 s on
        proxy.set_schedule([(0.0, None, 0.0), (0.6, 0.1, 0.0), (1.4, None, 0.0)], start=start)
        host, port = proxy.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as c:
            fast = _send_4k(c)
            assert proxy.step == 0
            time.sleep(max(0.0, start + 0.65 - time.monotonic()))
            slow = _send_4k(c)
            assert proxy.step == 1
            time.sleep(max(0.0, start + 1.45 - time.monotonic()))
            again = _send_4k(c)
            assert proxy.step == 2
    srv.close()
    assert slow >= 4096 * 8 / 0.1e6 * 0.95  # the bucket's rate, on the wire
    assert fast < slow / 2 and again < slow / 2  # loose: a loaded machine adds tens of ms to any exchange


def test_a_bad_proxy_schedule_is_refused():
    srv, target = _sink()
    with ThreadedLinkProxy(target) as proxy:
        with pytest.raises(ValueError, match="ascending"):
            proxy.set_schedule([(1.0, 1.0, 0.0), (0.5, 1.0, 0.0)])
        with pytest.raises(ValueError, match="bandwidth_mbps"):
            proxy.set_schedule([(0.0, 0.0, 0.0)])
    srv.close()


@pytest.mark.slow
def test_emulation_under_a_schedule_runs_every_strategy_for_real(tmp_path, capsys):
    """moe-sim --emulate --sweep: a relay worker and the hut's Classify server as real processes behind proxies that
    follow the schedule; split, offload-image, local and adaptive side by side; the simulator on the same scenario."""
    import json

    import yaml
    from moevit.sim.cli import main

    from moevit.checkpoint import save_checkpoint
    from tests.deploy import small_moe_model

    model = save_checkpoint(small_moe_model(num_experts=4, num_classes=3, image_size=64, calib_size=64,
                                            correction=False), tmp_path / "moe.safetensors")
    topo = yaml.safe_load(open("examples/sites-adaptive.yaml"))
    topo["model"] = str(model)
    topo["sites"]["cam-mcu"]["device"]["memory_mb"] = 64  # this small model fits: local runs too
    topo["placement"] = {1: {"cam-mcu": [0, 1, 2, 3]}, 5: {"relay-mcu": [0, 1, 2, 3]}, 8: {"relay-mcu": [0, 1, 2, 3]}}
    (tmp_path / "sites.yaml").write_text(yaml.safe_dump(topo))
    sweep = {"arrivals": [{"kind": "periodic", "interval_s": 0.5}], "images": 8,
             "strategies": ["split", "offload-image", "local-moe", "adaptive"],
             "settings": {"link_schedule": [{"from_s": 2, "sites": ["hut"], "bandwidth_mbps": 0.1,
                                             "latency_ms": 20, "tx_nj_per_bit": 6000}]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = tmp_path / "emu"
    rc = main(["--emulate", "--topology", str(tmp_path / "sites.yaml"), "--sweep", str(tmp_path / "sweep.yaml"),
               "--data", "synthetic:classes=3,per_class=20,size=64", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads((out / "emulation-schedule.json").read_text())
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["settings"]["image_bytes"] > 0 and r["calibration"] == cal
    fast, slow = r["per_phase"][0], r["per_phase"][1]
    assert set(fast["emulated"]) == {"split", "offload-image", "local-moe", "adaptive"}
    whole = r["per_phase"][-1]
    assert all(v["images"] == 8 for v in whole["emulated"].values())
    for row in (fast, slow):  # by when each image ran: a loaded machine starts some slots late
        assert all(v["images"] >= 1 for v in row["emulated"].values())
    # the hut's proxy fell to 0.1 Mbit/s at 2 s on its own clock: a ~1 kB PNG takes 80 ms more on the wire; split
    # and local do not use that link
    assert slow["emulated"]["offload-image"]["p50_s"] > fast["emulated"]["offload-image"]["p50_s"] + 0.05
    assert slow["emulated"]["offload-image"]["camera_j_per_image"] > fast["emulated"]["offload-image"][
        "camera_j_per_image"]
    rows = r["emulated_images"]
    assert all(row["bytes"]["relay-mcu"] > 0 and row["bytes"]["hut"] == 0 for row in rows["split"])
    assert all(row["bytes"]["hut"] > 0 and row["bytes"]["relay-mcu"] == 0 for row in rows["offload-image"])
    assert all(row["strategy"] in ("split", "offload-image", "local") for row in rows["adaptive"])
    assert {row["prediction"] for row in rows["split"]} <= {0, 1, 2}
    # the simulator ran the same scenario, and its error is reported both ways
    assert set(slow["sim_error"]["split"]) == {"p50_sim_vs_emu", "p95_sim_vs_emu", "p50_emu_vs_sim", "p95_emu_vs_sim"}
    assert "whole run" in text and "adaptive" in text
    # adaptive's strategy probes (held off while the others' images ran) are recorded apart, with their cost
    probes = r["strategy_probes"]["adaptive"]
    assert set(probes["by_strategy"]) == {"split", "offload-image"} and probes["camera_cpu_j_per_image"] >= 0
    assert "adaptive: strategy probes split" in text


def test_load_delay_delays_images_without_energy():
    """Settings.load_delay_s: each image draws one wait (seeded) before it starts; its energy is unchanged."""
    topo = _topology()
    stats = parse_stats(synthetic_stats(layers=(1, 5, 8), num_experts=4, num_classes=3, image_size=64, seed=0), "<s>")
    placement = Placement({(layer, e): ("relay",) for layer in (1, 5, 8) for e in range(4)})
    world = World(topologies={"t": topo}, placements={"t": placement}, stats=stats)

    def run(delays):
        sweep = parse_sweep({"strategies": ["split"], "images": 40, "arrivals": [{"kind": "periodic", "interval_s": 2}],
                             "settings": {"load_delay_s": delays}}, "sweep.yaml")
        return run_scenario(world, expand(sweep, ["t"])[0])

    base, loaded = run([0.0]), run([0.0, 0.5])
    extra = [b - a for a, b in zip(base.latencies_s, loaded.latencies_s, strict=True)]
    assert {round(x, 6) for x in extra} == {0.0, 0.5} and 5 < sum(x > 0 for x in extra) < 35
    assert loaded.image_energy_j == pytest.approx(base.image_energy_j)
    with pytest.raises(ConfigError, match=r"load_delay_s\[1\]"):
        parse_sweep({"settings": {"load_delay_s": [0.1, -1]}}, "sweep.yaml")
