"""``moe-sim --emulate --sweep SWEEP``: strategies side by side on the real coordinator and workers while the links
change mid-run (the sweep's ``settings.link_schedule``), and the same scenario in the simulator.

Method (docs/sim.md, "Emulation with a link schedule"):

1. **Processes.** A real worker (``moe-worker``) for every remote site of the placement, and, when offload-image or
   adaptive runs, the offload site's whole-model Classify server (``moe-coordinator --serve --as-site SITE
   --strategy local``), each behind its own :class:`sim.linkproxy.ThreadedLinkProxy`. Every strategy of the sweep
   (split, offload-image, local-moe as ``local`` where the camera's memory holds the model, adaptive) gets its own
   coordinator runtime (:func:`coordinator.strategies.open_runtime`, in this process), all reaching the sites
   through the same proxies.
2. **Calibration, a separate run first** (other images, drawn with another seed, none of them measured later):
   the compute speeds (``sim.emulate.calibrate``: the model timed back to back, then scaled to its time between
   split calls), the protocol's bytes and time per remote layer (split calls on those images, against the
   simulator's own prediction of them), the offload path's extra time per image (offload-image calls, likewise),
   the PNG and answer sizes, the machine's load (how much longer than the median each forward took: the simulator
   draws one such wait per image); the routing statistics are profiled on those images too. Written to
   ``calibration.json`` before the measured run starts; nothing measured later changes it.
3. **The measured run.** The proxies follow the schedule on their own clocks (``set_schedule``), all from one start
   time; images arrive as the sweep's periodic arrival says (slot i at ``i / rate_hz``); in each slot every strategy
   classifies the slot's image once, one after the other, in an order that rotates from slot to slot (so no strategy
   always runs first after the wait); each strategy has proxies of its own (all following the schedule), so none
   queues behind another's calls or probes. Per image: latency, the strategy that served it, bytes through each
   proxy, the camera's busy time (the CPU time of the classifying thread: on this shared machine the wall time also
   counts other jobs' turns on the cores) and each remote site's reported compute time.
4. **Energy per image**, on both sides by one rule: the coordinator's site: ``active_w`` x its busy time + the radio
   at its end (bytes x 8 x ``tx_nj_per_bit`` sent, ``rx_nj_per_bit`` received, the figures of the schedule step in
   effect); all sites: that plus each remote site's ``active_w`` x its compute and the radio at its end.
5. **The simulator** runs the same scenario (the sweep's schedule and arrival, the measured images' routing as a
   trace, in order, the calibration of step 2) per strategy, and both sides are compared per phase (p50/p95
   latency, energy per image) with the error both ways.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from moevit.deploy.topology import OffloadOptions, Placement, load_topology
from moevit.partition.costmodel import parse_stats
from moevit.sim.config import LinkStep, Settings, SimConfigError, check_sites, figures_at, load_sweep
from moevit.sim.engine import World, best_connected, run_scenario

__all__ = ["ScheduleOptions", "emulate_schedule", "format_schedule_report", "phase_table"]

EMULATED = {"split": "split", "offload-image": "offload-image", "local-moe": "local", "adaptive": "adaptive"}
TARGET_PHASE = 0.05  # adaptive within 5 % of the best fixed strategy's p95 in every phase
TARGET_SIM = 0.10  # the simulator's adaptive p95 within 10 % of the emulated one
CAL_ROUNDS = 3  # passes over the calibration images


@dataclass(frozen=True)
class ScheduleOptions:
    topology: str
    sweep: str
    out: str
    placement: str | None = None
    data: str | None = None
    threads: int = 1
    calibration_images: int = 20
    calibration_seed: int = 1
    deadline_s: float = 10.0


class _Subset:
    """A moevit dataset restricted to ``indices`` (profile_model reads items, classes and image_size)."""

    def __init__(self, ds: Any, indices: list[int]) -> None:
        self.ds, self.indices = ds, indices
        self.classes, self.image_size = ds.classes, ds.image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.ds[self.indices[i]]

    def describe(self) -> str:
        return f"{len(self.indices)} images of {self.ds.describe()}"


def _check(opts: ScheduleOptions) -> tuple[Any, Any, list[str], float]:
    """The topology and sweep, checked for what the emulation can run; (topology, sweep, strategies, rate_hz)."""
    topology = load_topology(opts.topology)
    sweep = load_sweep(opts.sweep)
    check_sites(sweep, {"base": topology})
    f = sweep.source
    if not sweep.settings.link_schedule:
        raise SimConfigError(f, "settings.link_schedule", "--emulate with --sweep runs a link schedule: give one")
    arr = sweep.arrivals[0]
    if len(sweep.arrivals) != 1 or arr.kind != "periodic":
        raise SimConfigError(f, "arrivals", "--emulate with --sweep needs exactly one arrival process, periodic")
    strategies = []
    for i, s in enumerate(sweep.strategies):
        if s not in EMULATED:
            raise SimConfigError(f, f"strategies[{i}]", f"--emulate runs {', '.join(EMULATED)} on the real system, "
                                 f"not {s!r}")
        strategies.append(s)
    for k in ("conditions", "failures"):
        if len(getattr(sweep, k)) != 1 or getattr(sweep, k)[0].name not in ("nominal", "none"):
            raise SimConfigError(f, k, "--emulate with --sweep takes the topology's links and no failures: leave "
                                 f"{k} out")
    if topology.model is None or not topology.model.is_file():
        raise SimConfigError(opts.topology, "model", f"--emulate runs the real model: {topology.model} is missing; "
                             "build it (make demo)")
    return topology, sweep, strategies, arr.rate_hz


def _steps_for(topology: Any, schedule: tuple[LinkStep, ...], site: str) -> list[tuple[float, float, float]]:
    """The proxy schedule of ``site``'s link: the topology's figures from 0, then each step that applies."""
    lk = topology.link_between(topology.coordinator, site)
    out = [(0.0, lk.bandwidth_mbps, lk.latency_ms)]
    for st in schedule:
        if st.applies(site):
            if st.from_s == 0.0:
                out = []
            out.append((st.from_s, st.bandwidth_mbps, st.latency_ms))
    return out


def _nj(topology: Any, schedule: tuple[LinkStep, ...], site: str, t: float) -> tuple[float, float]:
    """(tx, rx) nJ per bit of the link to ``site`` at run time ``t``."""
    lk = topology.link_between(topology.coordinator, site)
    st = figures_at([s for s in schedule if s.applies(site)], t)
    tx = lk.tx_nj_per_bit if st is None or st.tx_nj_per_bit is None else st.tx_nj_per_bit
    rx = lk.rx_nj_per_bit if st is None or st.rx_nj_per_bit is None else st.rx_nj_per_bit
    return tx, rx


def _phases(schedule: tuple[LinkStep, ...], horizon: float) -> list[tuple[float, float, str]]:
    """(from_s, to_s, description) of each step of the schedule before ``horizon``."""
    starts = sorted({0.0, *(s.from_s for s in schedule if s.from_s < horizon)})
    out = []
    for i, a in enumerate(starts):  # the last step lasts to the end (late slots may run past the horizon)
        b = starts[i + 1] if i + 1 < len(starts) else float("inf")
        desc = "; ".join(f"{','.join(s.sites) if s.sites else 'all'} {s.bandwidth_mbps:g} Mbit/s {s.latency_ms:g} ms"
                         for s in schedule if s.from_s == a) or "topology's links"
        out.append((a, b, desc))
    return out


def emulate_schedule(opts: ScheduleOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the comparison; see the module docstring. Returns the JSON record (also written to ``out``)."""
    topology, sweep, strategies, rate = _check(opts)
    import torch
    from moevit.coordinator.launcher import ensure_classify_server
    from moevit.coordinator.local import health_status
    from moevit.coordinator.strategies import model_mb, open_runtime
    from moevit.partition.profile import profile_model, select_images
    from moevit.sim.emulate import (
        _emulation_inputs,
        _remote_layers_per_image,
        _scaled,
        _simulate,
        _start_workers,
        _timed_forward,
        _trace,
        calibrate,
    )
    from moevit.sim.linkproxy import ThreadedLinkProxy
    from moevit.sim.trace import record_trace, write_trace

    from moevit.data import open_dataset

    torch.set_num_threads(opts.threads)
    schedule = sweep.settings.link_schedule
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = topology.model
    data, local_model, timed_model, placement = _emulation_inputs(opts, topology, model_path)
    need_mb = model_mb(local_model)
    cam = topology.site(topology.coordinator)
    not_run: dict[str, str] = {}
    if "local-moe" in strategies and cam.device.memory_mb < need_mb:
        not_run["local-moe"] = (f"{cam.name} memory_mb {cam.device.memory_mb:g} cannot hold the whole model "
                                f"({need_mb:.1f} MB)")
        strategies = [s for s in strategies if s != "local-moe"]
    offload_site = None
    if {"offload-image", "adaptive"} & set(strategies):
        offload_site = topology.offload.site or best_connected(topology)
        if offload_site != best_connected(topology):
            raise SimConfigError(opts.topology, "offload.site", f"the simulator offloads to the best-connected site "
                                 f"({best_connected(topology)}), not {offload_site}: make them one")
    remote = sorted(set(placement.sites()) - {topology.coordinator})
    proxied_sites = sorted(set(remote) | ({offload_site} if offload_site else set()))

    dataset = open_dataset(data, image_size=local_model.config.image_size, split="eval", seed=0)
    horizon = sweep.images / rate
    n = min(sweep.images, len(dataset))
    measured_idx = select_images(len(dataset), n, 0)
    rest = sorted(set(range(len(dataset))) - set(measured_idx))
    if len(rest) < 4:
        raise SimConfigError(sweep.source, "images", f"{n} measured images leave {len(rest)} of {dataset.describe()} "
                             "for the separate calibration run: measure fewer")
    cal_idx = [rest[i] for i in select_images(len(rest), min(opts.calibration_images, len(rest)),
                                              opts.calibration_seed)]
    images = [dataset[i][0] for i in measured_idx]
    labels = [int(dataset[i][1]) for i in measured_idx]
    cal_images = [dataset[i][0] for i in cal_idx]
    log(f"{n} measured images of {dataset.describe()}; calibration on {len(cal_idx)} others (seed "
        f"{opts.calibration_seed})")
    stats = parse_stats(profile_model(local_model, _Subset(dataset, cal_idx), seed=opts.calibration_seed),
                        "<calibration images>")
    header, recs = record_trace(local_model, zip(images, labels, strict=True))
    write_trace(out / "trace.jsonl", header, recs)
    trace = _trace(header, recs, str(out / "trace.jsonl"))

    logdir = Path(tempfile.mkdtemp(prefix="moe-sim-schedule-"))
    workers, addresses = _start_workers(opts.topology, model_path, remote, opts.threads, logdir, opts.placement, log)
    server = None
    proxies: dict[str, dict[str, ThreadedLinkProxy]] = {}  # strategy -> site -> its own proxy of that link
    runtimes: dict[str, Any] = {}
    try:
        if offload_site is not None:
            from moevit.coordinator.local import free_port

            addresses[offload_site + "#classify"] = addr = f"127.0.0.1:{free_port()}"
            server = ensure_classify_server(opts.topology, offload_site, addr, model=str(model_path),
                                            threads=opts.threads, check=lambda t: health_status(addr, t), log=log)
        if offload_site in remote:
            raise SimConfigError(opts.topology, "offload.site", f"{offload_site} holds experts and is the offload "
                                 "site: the emulation runs one process per site")
        # every strategy reaches the sites through proxies of its own (each following the schedule), so no
        # strategy's calls or probes queue behind another's on a shaped link
        for s in strategies:
            sites = dict(topology.sites)
            proxies[s] = {}
            for name in proxied_sites:
                target = addresses[name] if name in remote else addresses[name + "#classify"]
                proxies[s][name] = p = ThreadedLinkProxy(target)
                addr = p.start()
                if name in remote:
                    sites[name] = dataclasses.replace(sites[name], address=addr)
                st = figures_at([x for x in schedule if x.applies(name)], 0.0)
                lk = topology.link_between(topology.coordinator, name)
                p.set_shaping(bandwidth_mbps=lk.bandwidth_mbps if st is None else st.bandwidth_mbps,
                              latency_ms=lk.latency_ms if st is None else st.latency_ms)
            emu_topo = dataclasses.replace(
                topology, sites=sites, placement=placement,
                offload=OffloadOptions(site=offload_site, address=proxies[s][offload_site].address) if offload_site
                else topology.offload)
            runtimes[s] = open_runtime(emu_topo, model_path=model_path, strategy=EMULATED[s], wire="fp16",
                                       deadline_s=opts.deadline_s)
        for rt in runtimes.values():
            rt.check_workers(wait_s=30.0)

        # ---- 2. the calibration run: other images, before the measured run, its figures frozen
        with _probes_held(runtimes):  # adaptive's strategy probes would share the cores with the timed forwards
            cal = _calibration_run(runtimes, cal_images, timed_model, local_model, stats, topology, placement,
                                   proxies, calibrate, _scaled, _simulate, _timed_forward, _remote_layers_per_image,
                                   _trace, record_trace, log)
        (out / "calibration.json").write_text(json.dumps(cal["record"], indent=1) + "\n", encoding="utf-8")

        # ---- 3. the measured run
        start = time.monotonic() + 0.5
        for by_site in proxies.values():
            for name, p in by_site.items():
                p.reset_counters()
                p.set_schedule(_steps_for(topology, schedule, name), start=start)
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
        late = 0
        for i, x in enumerate(images):
            slot = start + i / rate
            wait = slot - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late += 1
            k = i % len(strategies)
            for s in strategies[k:] + strategies[:k]:
                # a probe (of a link or, adaptive's, of a strategy) runs between slots or in its strategy's own turn,
                # never on the cores while another strategy's image is timed: on a camera nothing else would be running
                with _probes_held(runtimes, but=s):
                    rows[s].append(_one(runtimes[s], s, x, i, time.monotonic() - start, proxies[s], topology,
                                        schedule))
                    runtimes[s].settle()  # the probes due after its image run in its own turn, as on a camera
        log(f"measured {n} slots x {len(strategies)} strategies; {late} slot(s) started late")
        # what went over each strategy's links outside its images' calls: probes (and health watches)
        outside = {s: {name: p.bytes_up + p.bytes_down - sum(r["bytes"][name] for r in rows[s])
                       for name, p in proxies[s].items()} for s in strategies}
        summaries = {s: rt.strategy_summary() for s, rt in runtimes.items()}
    finally:
        for rt in runtimes.values():
            rt.close()
        for by_site in proxies.values():
            for p in by_site.values():
                p.stop()
        if server is not None:
            server.stop()
        workers.stop()

    # ---- 5. the simulator, same scenario
    settings = dataclasses.replace(sweep.settings, wire="fp16", deadline_s=opts.deadline_s, concurrency=1,
                                   **cal["settings"])
    world = World(topologies={"emu": topology}, placements={"emu": placement}, stats=stats, trace=trace,
                  calibration=cal["calibration"])
    sim: dict[str, Any] = {}
    for s in [*strategies, *not_run]:
        res = run_scenario(world, dataclasses.replace(_simulate_scenario(sweep, s, n), settings=settings))
        sim[s] = res
    phases = _phases(schedule, horizon)
    record = _record(opts, topology, sweep, strategies, not_run, rows, sim, phases, cal, summaries, late, rate,
                     dataset.describe(), n)
    record["bytes_outside_images"] = outside
    # adaptive's strategy probes ran on the prober thread: their camera CPU is not in any image's busy time
    cam_w = topology.site(topology.coordinator).device.active_w
    record["strategy_probes"] = {
        s: {"by_strategy": summ["strategy_probes"], "camera_cpu_j_per_image": cam_w * sum(
            p["cpu_s"] for p in summ["strategy_probes"].values()) / max(1, n), "waits": summ["probe_waits"]}
        for s, summ in summaries.items() if summ.get("strategy_probes")}
    (out / "emulation-schedule.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


@contextlib.contextmanager
def _probes_held(runtimes: dict[str, Any], but: str | None = None) -> Any:
    """No probe of any runtime but ``but``'s starts in this block (StrategyRuntime.hold_probes)."""
    with contextlib.ExitStack() as stack:
        for s, rt in runtimes.items():
            if s != but:
                stack.enter_context(rt.hold_probes())
        yield


def _simulate_scenario(sweep: Any, strategy: str, n: int) -> Any:
    from moevit.sim.config import FailureSet, LinkCondition, Scenario

    return Scenario(topology="emu", condition=LinkCondition(), arrival=sweep.arrivals[0], failures=FailureSet(),
                    strategy=strategy, seed=0, images=n, settings=sweep.settings)


def _one(rt: Any, strategy: str, x: Any, i: int, t: float, proxies: dict[str, Any], topology: Any,
         schedule: tuple[LinkStep, ...]) -> dict[str, Any]:
    """Classify one image with ``rt``; its latency, strategy, bytes per link, busy times and energy. The camera's
    busy time is the CPU time of the thread that classifies (torch runs there at one thread): what the board's CPU
    would spend, where the wall time on this shared machine also counts the time other jobs held the cores."""
    before = {n: (p.bytes_up, p.bytes_down) for n, p in proxies.items()}
    calls0 = {n: c.traffic.calls for n, c in rt.primary.clients.items()}
    off_calls0 = rt.offload.calls if rt.offload is not None else 0
    c0 = time.thread_time()
    t0 = time.perf_counter()
    res = rt.classify(x[None])
    latency = time.perf_counter() - t0
    busy = time.thread_time() - c0
    used = res.strategy
    remote_s: dict[str, float] = {}
    for n, c in rt.primary.clients.items():
        dn = c.traffic.calls - calls0[n]
        if dn > 0:
            with c.traffic.lock:
                srv = list(c.traffic.server_ms)[-dn:]
            remote_s[n] = remote_s.get(n, 0.0) + sum(srv) / 1e3
    if rt.offload is not None and rt.offload.calls > off_calls0:
        remote_s[rt.offload.site] = remote_s.get(rt.offload.site, 0.0) + rt.offload.last_server_s
    cam = topology.site(topology.coordinator).device
    camera_j = cam.active_w * busy
    energy = camera_j
    link_bytes = {}
    for n, p in proxies.items():
        up, dn = p.bytes_up - before[n][0], p.bytes_down - before[n][1]
        link_bytes[n] = up + dn
        tx, rx = _nj(topology, schedule, n, t)
        camera_j += (up * tx + dn * rx) * 8e-9
        energy += (up + dn) * (tx + rx) * 8e-9
    for n, s in remote_s.items():
        energy += topology.site(n).device.active_w * s
    row = {"i": i, "t_s": round(t, 4), "latency_s": round(latency, 6), "strategy": used,
           "camera_busy_s": round(busy, 6), "remote_s": {k: round(v, 6) for k, v in remote_s.items()},
           "bytes": link_bytes, "camera_j": camera_j, "energy_j": energy,
           "prediction": int(res.logits.argmax(1)[0]), "degraded": bool(res.degraded[0])}
    if res.extra and "strategy_policy" in res.extra:
        row["policy"] = res.extra["strategy_policy"]
    return row


def _calibration_run(runtimes: dict[str, Any], cal_images: list[Any], timed_model: Any, local_model: Any,
                     stats: Any, topology: Any, placement: Placement, all_proxies: dict[str, dict[str, Any]],
                     calibrate: Any, _scaled: Any, _simulate: Any, _timed_forward: Any, _remote_layers: Any,
                     _trace: Any, record_trace: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Step 2 of the module docstring, on ``cal_images`` with the links at the topology's figures."""
    raw = calibrate(timed_model, cal_images, stats)
    # CAL_ROUNDS passes over the images, split, local forward and offload taking turns per image, medians: one
    # moment of heavy load on the shared machine moves a mean, not a median
    t_local: list[float] = []
    t_split: list[float] = []
    t_off: list[float] = []
    rt = runtimes.get("split")
    off = runtimes.get("offload-image")
    proxies = all_proxies.get("split", {})
    for x in cal_images[:2]:  # settle streams and flow control
        for r in (rt, off):
            if r is not None:
                r.classify(x[None])
    before = {s: (t["calls"], t["tokens"]) for s, t in rt.primary.traffic().items()} if rt is not None else {}
    off0 = (off.offload.calls, off.offload.bytes_sent, off.offload.bytes_received) if off is not None else None
    split_wire = 0
    for _ in range(CAL_ROUNDS):
        for x in cal_images:
            if rt is not None:
                b0 = {n: p.bytes_up + p.bytes_down for n, p in proxies.items() if n in rt.primary.clients}
                t_split.append(rt.classify(x[None]).seconds)
                split_wire += sum(p.bytes_up + p.bytes_down - b0[n] for n, p in proxies.items() if n in b0)
            t_local.append(_timed_forward(timed_model, x))
            if off is not None:
                t_off.append(off.classify(x[None]).seconds)
    ovh_bytes = 300
    if rt is not None:
        after = rt.primary.traffic()
        calls = sum(after[s]["calls"] - before[s][0] for s in after)
        from moevit.sim.emulate import _dim_share

        payload = sum(2 * (after[s]["tokens"] - before[s][1]) * 2 * _dim_share(rt.primary, s, stats) for s in after)
        ovh_bytes = max(0, round((split_wire - payload) / max(2 * calls, 1)))
    calib = _scaled(raw, stats, statistics.median(t_local), "the calibration images, between split calls (median)")
    hw, rw = record_trace(local_model, ((x, None) for x in cal_images))
    cal_trace = _trace(hw, rw, "<calibration images>")
    world = World(topologies={"emulated": topology}, placements={"emulated": placement}, stats=stats,
                  trace=cal_trace, calibration=calib)
    ovh_s = 0.0
    if t_split:
        res = _simulate(world, "split", len(cal_images), Settings(rpc_overhead_bytes=ovh_bytes))
        layers = _remote_layers(stats, cal_trace, placement, topology.coordinator)
        ovh_s = max(0.0, (statistics.median(t_split) - statistics.median(res.latencies_s)) / max(layers, 1e-9))
    # the machine's load as the calibration run saw it: how much longer than the median each forward took (a wait for
    # a core: additive, not a factor on the work; the simulator draws one per image: Settings.load_delay_s)
    med = statistics.median(t_local)
    extra: dict[str, Any] = {"rpc_overhead_bytes": ovh_bytes, "rpc_overhead_s": ovh_s,
                             "load_delay_s": tuple(round(max(0.0, t - med), 5) for t in t_local)}
    rec: dict[str, Any] = {"images": len(cal_images), "rounds": CAL_ROUNDS, "calibration": dataclasses.asdict(calib),
                           "split_median_ms": statistics.median(t_split) * 1e3 if t_split else None,
                           "local_between_calls_median_ms": statistics.median(t_local) * 1e3}
    if off is not None and off0 is not None:
        k = off.offload.calls - off0[0]
        extra["image_bytes"] = round((off.offload.bytes_sent - off0[1]) / k)
        extra["result_bytes"] = round((off.offload.bytes_received - off0[2]) / k)
        st = Settings(rpc_overhead_bytes=ovh_bytes, rpc_overhead_s=ovh_s, image_bytes=extra["image_bytes"],
                      result_bytes=extra["result_bytes"])
        res = _simulate(world, "offload-image", len(cal_images), st)
        extra["offload_overhead_s"] = max(0.0, statistics.median(t_off) - statistics.median(res.latencies_s))
        rec["offload_median_ms"] = statistics.median(t_off) * 1e3
    rec["settings"] = extra
    log(f"calibration ({len(cal_images)} other images): trunk {calib.trunk_gflops:.2f} GFLOP/s, experts "
        f"{calib.expert_gflops:.2f} GFLOP/s; " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()
                                                          if k != "load_delay_s")
        + f"; load delay p95 {float(np.percentile(extra['load_delay_s'], 95)) * 1e3:.1f} ms")
    return {"calibration": calib, "settings": extra, "record": rec}


def _pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


def _stats(lat: list[float], cam: list[float], energy: list[float], used: list[str]) -> dict[str, Any]:
    u: dict[str, int] = {}
    for s in used:
        u[s] = u.get(s, 0) + 1
    return {"images": len(lat), "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95),
            "mean_s": float(np.mean(lat)) if lat else None,
            "camera_j_per_image": float(np.mean(cam)) if cam else None,
            "energy_j_per_image": float(np.mean(energy)) if energy else None, "used": u}


def phase_table(rows: dict[str, list[dict[str, Any]]], sim: dict[str, Any], phases: list[tuple[float, float, str]],
                rate: float) -> list[dict[str, Any]]:
    """Per phase and over the run: each strategy's emulated and simulated figures, and the errors both ways."""
    out = []
    for lo, hi, desc in [*phases, (0.0, float("inf"), "whole run")]:
        row: dict[str, Any] = {"phase": desc, "from_s": lo, "to_s": None if hi == float("inf") else hi,
                               **({"whole_run": True} if desc == "whole run" else {}),
                               "emulated": {}, "simulated": {}, "sim_error": {}}
        for s, rs in rows.items():
            sel = [r for r in rs if lo <= r["t_s"] < hi]  # by when it ran: a late slot runs in the link of then
            row["emulated"][s] = _stats([r["latency_s"] for r in sel], [r["camera_j"] for r in sel],
                                        [r["energy_j"] for r in sel], [r["strategy"] for r in sel])
        for s, res in sim.items():
            if res.error is not None:
                row["simulated"][s] = {"error": res.error}
                continue
            idx = [k for k, t in enumerate(res.arrivals_s) if lo <= t < hi]
            row["simulated"][s] = _stats([res.latencies_s[k] for k in idx], [res.image_camera_j[k] for k in idx],
                                         [res.image_energy_j[k] for k in idx],
                                         [res.image_strategies[k] for k in idx] if res.image_strategies else
                                         [s] * len(idx))
            e = row["emulated"].get(s)
            if e is not None and e["images"]:
                sm = row["simulated"][s]
                row["sim_error"][s] = {
                    f"{q}_sim_vs_emu": (sm[f"{q}_s"] - e[f"{q}_s"]) / e[f"{q}_s"] for q in ("p50", "p95")} | {
                    f"{q}_emu_vs_sim": (e[f"{q}_s"] - sm[f"{q}_s"]) / sm[f"{q}_s"] for q in ("p50", "p95")}
        out.append(row)
    return out


def _targets(table: list[dict[str, Any]], side: str) -> dict[str, Any]:
    fixed = [s for s in table[0][side] if s != "adaptive" and table[0][side][s].get("p95_s") is not None]
    if "adaptive" not in table[0][side] or not fixed:
        return {}
    per_phase = []
    for row in table[:-1]:
        d = row[side]
        best = min(fixed, key=lambda s: d[s]["p95_s"])
        per_phase.append({"phase": row["phase"], "best_fixed": best, "best_p95_s": d[best]["p95_s"],
                          "adaptive_p95_s": d["adaptive"]["p95_s"],
                          "adaptive_over_best": d["adaptive"]["p95_s"] / d[best]["p95_s"] - 1,
                          "met": d["adaptive"]["p95_s"] <= (1 + TARGET_PHASE) * d[best]["p95_s"]})
    w = table[-1][side]
    whole = {f"{k}_vs_{s}": w["adaptive"][f] / w[s][f] - 1 for s in fixed
             for k, f in (("p95", "p95_s"), ("camera_j", "camera_j_per_image"), ("energy_j", "energy_j_per_image"))}
    return {"per_phase": per_phase, "whole_run_adaptive_relative": whole,
            "adaptive_beats_every_fixed_p95": all(w["adaptive"]["p95_s"] < w[s]["p95_s"] for s in fixed),
            "adaptive_beats_every_fixed_camera_energy": all(
                w["adaptive"]["camera_j_per_image"] < w[s]["camera_j_per_image"] for s in fixed),
            "adaptive_beats_every_fixed_all_sites_energy": all(
                w["adaptive"]["energy_j_per_image"] < w[s]["energy_j_per_image"] for s in fixed)}


def _record(opts: ScheduleOptions, topology: Any, sweep: Any, strategies: list[str], not_run: dict[str, str],
            rows: dict[str, list[dict[str, Any]]], sim: dict[str, Any], phases: list[tuple[float, float, str]],
            cal: dict[str, Any], summaries: dict[str, Any], late: int, rate: float, data: str,
            n: int) -> dict[str, Any]:
    import os

    table = phase_table(rows, sim, phases, rate)
    sim_p95 = table[-1]["sim_error"].get("adaptive", {}).get("p95_sim_vs_emu")
    return {
        "what": "strategies on the real coordinator and workers under a link schedule, and the simulator on the "
                "same scenario (moe-sim --emulate --sweep)",
        "topology": opts.topology, "sweep": opts.sweep, "placement": opts.placement, "model": str(topology.model),
        "data": data, "images_per_strategy": n, "arrival_rate_hz": rate, "slots_started_late": late,
        "schedule": [dataclasses.asdict(s) for s in sweep.settings.link_schedule],
        "strategies": strategies, "not_run": not_run,
        "calibration": cal["record"], "per_phase": table,
        "targets": {"emulated": _targets(table, "emulated"), "simulated": _targets(table, "simulated"),
                    "sim_adaptive_p95_error": sim_p95,
                    "sim_adaptive_p95_within_10pct": None if sim_p95 is None else abs(sim_p95) <= TARGET_SIM},
        "strategy_summaries": summaries, "load_average_1_5_15": list(os.getloadavg()),
        "emulated_images": rows,
        "simulated_images": {s: {"arrival_s": r.arrivals_s, "latency_s": r.latencies_s, "camera_j": r.image_camera_j,
                                 "energy_j": r.image_energy_j, "strategy": r.image_strategies}
                             for s, r in sim.items() if r.error is None},
    }


def format_schedule_report(r: dict[str, Any]) -> str:
    """The per-phase table of the record: p50/p95 ms and mJ per image, emulated | simulated, per strategy."""
    lines = [f"{r['images_per_strategy']} images per strategy at {r['arrival_rate_hz']:g} Hz of {r['data']}; "
             f"{r['slots_started_late']} slot(s) started late; load average {r['load_average_1_5_15'][0]:.1f}"]
    for s, why in r["not_run"].items():
        lines.append(f"{s}: not run ({why})")
    lines.append(f"{'phase':<34} {'strategy':<14} {'emu p50':>8} {'p95':>8} {'cam mJ':>7} {'all mJ':>7} | "
                 f"{'sim p50':>8} {'p95':>8} {'cam mJ':>7} {'all mJ':>7} | {'p95 err':>7}  used (emulated)")
    for row in r["per_phase"]:
        for s, e in row["emulated"].items():
            m = row["simulated"].get(s, {})
            err = row["sim_error"].get(s, {}).get("p95_sim_vs_emu")
            used = ", ".join(f"{k} {v}" for k, v in sorted(e["used"].items()))

            def ms(v: float | None) -> str:
                return f"{v * 1e3:8.1f}" if v is not None else f"{'-':>8}"

            def mj(v: float | None) -> str:
                return f"{v * 1e3:7.2f}" if v is not None else f"{'-':>7}"

            lines.append(f"{row['phase'][:34]:<34} {s:<14} {ms(e['p50_s'])} {ms(e['p95_s'])} "
                         f"{mj(e['camera_j_per_image'])} {mj(e['energy_j_per_image'])} | {ms(m.get('p50_s'))} "
                         f"{ms(m.get('p95_s'))} {mj(m.get('camera_j_per_image'))} {mj(m.get('energy_j_per_image'))}"
                         f" | {'' if err is None else f'{err:+7.1%}'}  {used}")
    t = r["targets"]
    for side in ("emulated", "simulated"):
        d = t.get(side) or {}
        for ph in d.get("per_phase", []):
            lines.append(f"{side}: {ph['phase'][:34]}: adaptive p95 {ph['adaptive_over_best']:+.1%} vs best fixed "
                         f"({ph['best_fixed']}): {'met' if ph['met'] else 'NOT met'} (target +5 %)")
        if d:
            lines.append(f"{side}: whole run: adaptive beats every fixed strategy on p95: "
                         f"{d['adaptive_beats_every_fixed_p95']}, camera energy: "
                         f"{d['adaptive_beats_every_fixed_camera_energy']}, all-sites energy: "
                         f"{d['adaptive_beats_every_fixed_all_sites_energy']}")
    for s, probes in r.get("strategy_probes", {}).items():
        lines.append(f"{s}: strategy probes " + ", ".join(
            f"{k} {p['probes']} ({p['bytes'] / 1e3:.1f} kB)" for k, p in probes["by_strategy"].items())
            + f"; their camera CPU {probes['camera_cpu_j_per_image'] * 1e3:.2f} mJ per image "
            f"(not in the table); {probes['waits']['images']} image(s) waited {probes['waits']['seconds']:.3f} s "
            "behind one")
    if t.get("sim_adaptive_p95_error") is not None:
        lines.append(f"simulated vs emulated adaptive p95 over the run: {t['sim_adaptive_p95_error']:+.1%} "
                     "(target within 10 %)")
    return "\n".join(lines)
