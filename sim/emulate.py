"""``moe-sim --emulate``: check the simulator against the real system on one machine.

Method (docs/sim.md, "Emulation"):

1. The topology's model runs in-process; its routing on the measured images is recorded as a trace, and its routing
   statistics are profiled (partition.profile) on the same images, so the simulator replays the exact routing the
   real run sees.
2. Real workers start on loopback (``python -m moevit.worker.cli --topology ... --site ... --listen ADDR``, like
   coordinator/launcher.py), each behind a :class:`sim.linkproxy.ThreadedLinkProxy`; the coordinator
   (:class:`coordinator.runtime.SplitRuntime`, in-process) reaches every remote site through its proxy.
3. Calibration of compute speed, on separate warm-up images: the model is timed back to back (batch 1, the
   coordinator's threads), the expert calls timed inside it, which splits its time into trunk and experts: trunk
   GFLOP/s = trunk MACs x 2 / (time - expert time), expert GFLOP/s = expert MACs x 2 / expert time. A forward right
   after a wait on the network runs slower than one of a back-to-back series (caches, clock; up to 2x on a shared
   laptop), so both speeds are then scaled by one factor to the model's mean time when it runs between split calls
   on the shaped links, as in the measured run: the warm-up images are timed that way during the measured run
   itself (taking turns with the measured images), so drift on a shared machine affects both alike. These speeds
   replace the topology's field-hardware figures at every site, for this run only.
4. Protocol figures, on the warm-up images with the proxies shaped like the links but at 4x their bandwidth:
   the protocol bytes per RPC message above the token payload (``rpc_overhead_bytes``, from the proxies' byte
   counters), and the time a remote layer costs beyond what the simulator counts (``rpc_overhead_s``: measured mean
   minus the simulator's own prediction of that pass, per layer with a remote call: serialisation, gRPC, the
   worker's dispatch).
5. The measured run: proxies shaped like the topology's links (bandwidth scaled so the fastest carries
   ``bandwidth_mbps``: network time then dominates loopback noise; loss and duty cycle are not emulated, 0 and 1 on
   both sides); each image is classified once split (``SplitRuntime.classify``, end to end) and once by the
   in-process model (``local-moe``), interleaved, one image at a time.
6. The simulator runs the same images (the trace, in order), one at a time, on the scaled topology with the
   calibration, and the mean latencies are compared. The transfer times at the measured bandwidth are untouched by
   calibration (they are what the check tests); local-moe shows how stable the compute calibration is.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moevit.deploy.topology import Placement, Topology, load_placement, load_topology, validate_placement
from moevit.partition.costmodel import FLOPS_PER_MAC, parse_stats
from moevit.sim.config import Arrival, FailureSet, LinkCondition, Scenario, Settings, SimConfigError
from moevit.sim.engine import Calibration, World, run_scenario
from moevit.sim.trace import Trace, TraceHeader, TraceImage, write_trace

__all__ = ["EmulationOptions", "EmulationReport", "StrategyCheck", "calibrate", "emulate", "format_report",
           "scale_links"]

TARGET_REL_ERROR = 0.10
CAL_BANDWIDTH_FACTOR = 4.0


@dataclass(frozen=True)
class EmulationOptions:
    topology: str
    out: str
    images: int = 30
    bandwidth_mbps: float = 2.0
    threads: int = 1
    placement: str | None = None
    data: str | None = None
    warmup: int = 16
    deadline_s: float = 60.0


@dataclass(frozen=True)
class StrategyCheck:
    strategy: str
    measured_mean_ms: float
    measured_p50_ms: float
    simulated_mean_ms: float
    simulated_p50_ms: float
    rel_error: float
    measured_bytes_per_image: float | None = None
    simulated_bytes_per_image: float | None = None


@dataclass
class EmulationReport:
    topology: str
    model: str
    images: int
    data: str
    scale: float
    links: dict[str, dict[str, float]]
    calibration: Calibration
    rpc_overhead_s: float
    rpc_overhead_bytes: int
    checks: list[StrategyCheck] = field(default_factory=list)
    measured_ms: dict[str, list[float]] = field(default_factory=dict)
    simulated_ms: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scale_links(topology: Topology, sites: set[str], bandwidth_mbps: float) -> tuple[Topology, float]:
    """The topology with every link scaled by one factor so that the fastest coordinator link to ``sites`` carries
    ``bandwidth_mbps``; loss 0 and duty cycle 1 (the proxy emulates neither). Returns (topology, factor)."""
    fastest = max((lk.bandwidth_mbps for s in sites if (lk := topology.link_between(topology.coordinator, s))),
                  default=None)
    if fastest is None:
        return topology, 1.0
    factor = bandwidth_mbps / fastest
    links = tuple(dataclasses.replace(lk, bandwidth_mbps=lk.bandwidth_mbps * factor, loss=0.0, duty_cycle=1.0)
                  for lk in topology.links)
    return dataclasses.replace(topology, links=links), factor


def calibrate(model: Any, images: list[Any], stats: Any, *, rounds: int = 5) -> Calibration:
    """Time ``model`` (batch 1) on ``images``, the experts' share measured inside it; see the module docstring."""
    import torch

    from moevit.moe.dispatcher import LocalDispatcher

    class _Timed(LocalDispatcher):
        spent = 0.0

        def compute(self, layer_id: int, plan: Any) -> list[torch.Tensor]:
            t0 = time.perf_counter()
            out = super().compute(layer_id, plan)
            _Timed.spent += time.perf_counter() - t0
            return out

    layers = model.moe_layers()

    def one_pass() -> tuple[float, float]:
        _Timed.spent = 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in images:
                model(x[None])
        return (time.perf_counter() - t0) / len(images), _Timed.spent / len(images)

    try:
        for layer in layers.values():
            layer.set_dispatcher(_Timed(layer.experts))
        for _ in range(2):  # warm-up: allocator, caches, lazy initialisation at batch 1
            one_pass()
        passes = [one_pass() for _ in range(rounds)]
    finally:
        for layer in layers.values():
            layer.set_dispatcher(None)
    # The median pass is the machine's speed; the experts' share is timed around their calls, so it does not
    # vanish into the noise of a difference between two passes.
    t_moe = statistics.median(p[0] for p in passes)
    t_exp = max(statistics.median(p[1] for p in passes), 1e-7)
    t_trunk = max(t_moe - t_exp, 1e-7)
    expert_macs = sum(ls.patches * stats.top_k * stats.pixels_per_patch * ls.expert_macs_per_token
                      for ls in stats.layers)
    return Calibration(
        trunk_gflops=stats.trunk_macs * FLOPS_PER_MAC / t_trunk / 1e9,
        expert_gflops=expert_macs * FLOPS_PER_MAC / t_exp / 1e9,
        how=f"batch 1, {torch.get_num_threads()} torch thread(s), median of {rounds} passes over {len(images)} "
            f"images: {t_moe * 1e3:.2f} ms, of which {t_exp * 1e3:.2f} ms in the experts' calls")


def _start_workers(topology_path: str, model: Path, sites: list[str], threads: int, logdir: Path,
                   placement_file: str | None, log: Callable[[str], None]) -> tuple[Any, dict[str, str]]:
    """A worker process per site on a free loopback port (the harness of coordinator/local.py, as the launcher's)."""
    from moevit.coordinator.launcher import LocalWorkers
    from moevit.coordinator.local import free_port, spawn_worker, wait_serving

    workers = LocalWorkers()
    addresses: dict[str, str] = {}
    topo_arg = topology_path
    if placement_file is not None:  # the workers must host what the coordinator's placement gives them
        import yaml
        from moevit.deploy.topology import read_yaml

        doc = dict(read_yaml(topology_path))
        doc["placement"] = str(Path(placement_file).resolve())
        if doc.get("model") is not None:
            doc["model"] = str(model)
        tmp = logdir / "topology-with-placement.yaml"
        tmp.write_text(yaml.safe_dump(doc))
        topo_arg = str(tmp)
    try:
        for name in sites:
            addr = f"127.0.0.1:{free_port()}"
            logf = logdir / f"{name}.log"
            workers.logs[name] = logf
            args = ["--topology", topo_arg, "--site", name, "--listen", addr, "--threads", str(threads),
                    "--model", str(model), "--log-level", "warning"]
            workers.procs[name] = spawn_worker(args, log=logf)
            addresses[name] = addr
            log(f"started a worker for {name} at {addr} (log {logf})")
        deadline = time.monotonic() + 120
        for name, proc in workers.procs.items():
            wait_serving(addresses[name], proc, max(0.0, deadline - time.monotonic()), what=f"worker for {name}")
    except BaseException:
        workers.stop()
        raise
    return workers, addresses


def _simulate(world: World, strategy: str, n: int, settings: Settings) -> Any:
    # One image at a time, as measured: arrivals far enough apart that no image ever waits.
    sc = Scenario(topology="emulated", condition=LinkCondition("as-emulated"),
                  arrival=Arrival("one-at-a-time", "periodic", rate_hz=0.1), failures=FailureSet(),
                  strategy=strategy, seed=0, images=n, settings=settings)
    return run_scenario(world, sc)


def _emulation_inputs(opts: Any, topology: Any, model_path: Any) -> tuple[str, Any, Any, Placement]:
    """What an emulation runs on (``opts`` has ``data``, ``topology`` and ``placement``): the image spec, the model
    as checkpointed (profile and traces: its fingerprint), its folded copy (timings: the trunk as the coordinator
    runs it) and the placement, checked against the topology."""
    from moevit.sim.inputs import default_data

    from moevit.checkpoint import load_checkpoint
    from moevit.fuse import folded_copy

    data = opts.data or default_data(model_path)
    if data is None:
        raise SimConfigError(opts.topology, "model", f"--emulate needs images for {model_path}: pass --data SPEC")
    local_model = load_checkpoint(model_path).eval()
    timed_model = folded_copy(local_model)
    layout = {i: m.num_experts for i, m in local_model.moe_layers().items()}
    if opts.placement is not None:
        placement: Placement = load_placement(opts.placement, known_sites=topology.sites, sites_from=opts.topology)
        validate_placement(placement, topology, layout)
    else:
        placement = topology.resolve_placement(layout)
    return data, local_model, timed_model, placement


def emulate(opts: EmulationOptions, *, log: Callable[[str], None] = print) -> EmulationReport:
    """Run the check; see the module docstring."""
    if opts.images < 2:
        raise SimConfigError("--images", "", f"the emulation needs at least 2 images, got {opts.images}")
    topology = load_topology(opts.topology)
    if topology.model is None or not topology.model.is_file():
        raise SimConfigError(opts.topology, "model", "--emulate runs the real model: the topology must name an "
                             f"existing model file (got {topology.model}); build it (make demo)")
    import torch
    from moevit.coordinator.runtime import SplitRuntime
    from moevit.partition.profile import profile_model, select_images
    from moevit.sim.linkproxy import ThreadedLinkProxy
    from moevit.sim.trace import record_trace

    from moevit.checkpoint import load_checkpoint
    from moevit.data import open_dataset

    torch.set_num_threads(opts.threads)
    model_path = topology.model
    data, local_model, timed_model, placement = _emulation_inputs(opts, topology, model_path)
    split_model = load_checkpoint(model_path)
    remote = sorted(set(placement.sites()) - {topology.coordinator})
    dataset = open_dataset(data, image_size=local_model.config.image_size, split="eval", seed=0)
    n = min(opts.images, len(dataset))
    chosen = select_images(len(dataset), n, 0)
    images = [dataset[i][0] for i in chosen]
    labels = [int(dataset[i][1]) for i in chosen]
    warm = [dataset[i][0] for i in select_images(len(dataset), min(opts.warmup, len(dataset)), 1)]
    log(f"profiling and recording the routing of {n} images of {dataset.describe()}")
    stats = parse_stats(profile_model(local_model, dataset, images=n, seed=0), "<emulation profile>")
    header, recs = record_trace(local_model, zip(images, labels, strict=True))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    write_trace(out / "emulation-trace.jsonl", header, recs)
    trace = _trace(header, recs, str(out / "emulation-trace.jsonl"))
    emu_topology, factor = scale_links(topology, set(remote), opts.bandwidth_mbps)

    logdir = Path(tempfile.mkdtemp(prefix="moe-sim-emulate-"))
    workers, addresses = _start_workers(opts.topology, model_path, remote, opts.threads, logdir, opts.placement, log)
    proxies: dict[str, ThreadedLinkProxy] = {}
    runtime = None
    try:
        sites = dict(emu_topology.sites)
        for name in remote:
            proxies[name] = ThreadedLinkProxy(addresses[name])
            sites[name] = dataclasses.replace(sites[name], address=proxies[name].start())
        runtime = SplitRuntime(split_model, dataclasses.replace(emu_topology, sites=sites), placement, wire="fp16",
                               deadline_s=opts.deadline_s)
        runtime.check_workers()
        # 2. calibration, with the workers up (they share the cores, as in the measured run)
        raw = calibrate(timed_model, warm, stats)
        links: dict[str, dict[str, float]] = {}

        def shape(bandwidth_factor: float = 1.0) -> None:
            for name, p in proxies.items():
                lk = emu_topology.link_between(emu_topology.coordinator, name)
                assert lk is not None
                p.set_shaping(bandwidth_mbps=lk.bandwidth_mbps * bandwidth_factor, latency_ms=lk.latency_ms)
                links[name] = {"bandwidth_mbps": lk.bandwidth_mbps, "latency_ms": lk.latency_ms}

        # A forward right after waiting on the network runs slower than one of a back-to-back series (caches, clock
        # frequency, here up to 2x); the measured run interleaves split calls and local forwards, so the speeds are
        # scaled to the model's mean time in that same pattern, on the warm-up images. This first scaling serves the
        # protocol pass below; the final one is timed during the measured run itself (step 5), so a shared machine's
        # drift between the passes does not end up in the comparison.
        shape()
        for x in warm[:2]:
            runtime.classify(x[None])
        t_local = []
        for x in warm:
            runtime.classify(x[None])
            t_local.append(_timed_forward(timed_model, x))
        calib_a = _scaled(raw, stats, statistics.fmean(t_local), "warm-up images between split calls")
        # 4. protocol figures, on the warm-up images with the links' latencies and CAL_BANDWIDTH_FACTOR times their
        # bandwidth (the proxies on the same shaping path, waits of the same order, but transfer times a quarter of
        # those the measurement tests): bytes per message from the proxies' counters, and the time a remote layer
        # costs beyond what the simulator already counts (its own prediction of this pass with no protocol time).
        shape(CAL_BANDWIDTH_FACTOR)
        for x in warm[:2]:
            runtime.classify(x[None])
        for p in proxies.values():
            p.reset_counters()
        before = {s: (t["calls"], t["tokens"]) for s, t in runtime.traffic().items()}
        t_split = [runtime.classify(x[None]).seconds for x in warm]
        after = runtime.traffic()
        calls = sum(after[s]["calls"] - before[s][0] for s in after)
        payload = 0.0
        for s in after:
            tokens = after[s]["tokens"] - before[s][1]
            payload += 2 * tokens * 2 * _dim_share(runtime, s, stats)  # both ways, fp16
        wire = sum(p.bytes_up + p.bytes_down for p in proxies.values())
        ovh_bytes = max(0, round((wire - payload) / max(2 * calls, 1)))
        hw, rw = record_trace(local_model, ((x, None) for x in warm))
        warm_trace = _trace(hw, rw, "<warm-up>")
        remote_layers = _remote_layers_per_image(stats, warm_trace, placement, topology.coordinator)
        cal_topology = dataclasses.replace(emu_topology, links=tuple(
            dataclasses.replace(lk, bandwidth_mbps=lk.bandwidth_mbps * CAL_BANDWIDTH_FACTOR)
            for lk in emu_topology.links))
        cal_world = World(topologies={"emulated": cal_topology}, placements={"emulated": placement}, stats=stats,
                          trace=warm_trace, calibration=calib_a)
        predicted = _simulate(cal_world, "split", len(warm), Settings(rpc_overhead_bytes=ovh_bytes)).latency_mean_s
        ovh_s = max(0.0, (statistics.fmean(t_split) - predicted) / max(remote_layers, 1e-9))
        log(f"loopback protocol cost per remote layer: {ovh_s * 1e3:.2f} ms, {ovh_bytes} B per message above the "
            f"payload ({calls} calls)")
        # 5. shaped like the (scaled) topology: the measured run
        shape()
        log(f"links scaled by {factor:.3g}: " + ", ".join(f"{k} {v['bandwidth_mbps']:.3g} Mbit/s {v['latency_ms']:g} "
                                                           f"ms" for k, v in links.items()))
        for x in warm[:2]:  # the first shaped calls pay nothing extra, but settle HTTP/2 flow control
            runtime.classify(x[None])
        for p in proxies.values():
            p.reset_counters()
        measured: dict[str, list[float]] = {"split": [], "local-moe": []}
        t_cal: list[float] = []
        for i, x in enumerate(images):
            measured["split"].append(runtime.classify(x[None]).seconds)
            # the calibration forward (a warm-up image, not a measured one) takes turns with the measured one in
            # coming right after the split call, so both see the same mix of "just woke up" and "already running"
            w = warm[i % len(warm)]
            if i % 2:
                measured["local-moe"].append(_timed_forward(timed_model, x))
                t_cal.append(_timed_forward(timed_model, w))
            else:
                t_cal.append(_timed_forward(timed_model, w))
                measured["local-moe"].append(_timed_forward(timed_model, x))
        calib = _scaled(raw, stats, statistics.fmean(t_cal), "warm-up images timed during the measured run")
        log(f"calibration: trunk {calib.trunk_gflops:.2f} GFLOP/s, experts {calib.expert_gflops:.2f} GFLOP/s "
            f"({calib.how})")
        wire_bytes = sum(p.bytes_up + p.bytes_down for p in proxies.values()) / len(images)
    finally:
        if runtime is not None:
            runtime.close()
        for p in proxies.values():
            p.stop()
        workers.stop()

    # 6. the simulator on the same images
    world = World(topologies={"emulated": emu_topology}, placements={"emulated": placement}, stats=stats,
                  trace=trace, calibration=calib)
    settings = Settings(wire="fp16", deadline_s=opts.deadline_s, rpc_overhead_bytes=ovh_bytes, rpc_overhead_s=ovh_s,
                        concurrency=1)
    report = EmulationReport(topology=opts.topology, model=str(model_path), images=len(images),
                             data=dataset.describe(), scale=factor, links=links, calibration=calib,
                             rpc_overhead_s=ovh_s, rpc_overhead_bytes=ovh_bytes)
    for strategy in ("split", "local-moe"):
        res = _simulate(world, strategy, len(images), settings)
        sim_ms = [v * 1e3 for v in res.latencies_s]
        meas_ms = [v * 1e3 for v in measured[strategy]]
        m, s = statistics.fmean(meas_ms), statistics.fmean(sim_ms)
        report.checks.append(StrategyCheck(
            strategy=strategy, measured_mean_ms=m, measured_p50_ms=statistics.median(meas_ms), simulated_mean_ms=s,
            simulated_p50_ms=statistics.median(sim_ms), rel_error=(s - m) / m,
            measured_bytes_per_image=wire_bytes if strategy == "split" else 0.0,
            simulated_bytes_per_image=res.bytes_per_image))
        report.measured_ms[strategy] = meas_ms
        report.simulated_ms[strategy] = sim_ms
    return report


def _timed_forward(model: Any, x: Any) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        model(x[None])
    return time.perf_counter() - t0


def _scaled(raw: Calibration, stats: Any, mean_s: float, where: str) -> Calibration:
    """``raw`` with both speeds scaled by one factor so that the model takes ``mean_s`` at batch 1."""
    slow = mean_s / _raw_moe_s(raw, stats)
    return Calibration(trunk_gflops=raw.trunk_gflops / slow, expert_gflops=raw.expert_gflops / slow,
                       how=f"{raw.how}; scaled by 1/{slow:.3f} to the mean {mean_s * 1e3:.2f} ms of the model on "
                           f"{where}")


def _raw_moe_s(c: Calibration, stats: Any) -> float:
    """The MoE model's batch-1 time implied by a calibration."""
    expert_macs = sum(ls.patches * stats.top_k * stats.pixels_per_patch * ls.expert_macs_per_token
                      for ls in stats.layers)
    return (stats.trunk_macs / c.trunk_gflops + expert_macs / c.expert_gflops) * FLOPS_PER_MAC / 1e9


def _trace(header: TraceHeader, recs: list[TraceImage], source: str) -> Trace:
    import numpy as np

    return Trace(header=header,
                 patches={k: np.array([np.asarray(r.patches[k]) for r in recs]) for k in header.layers},
                 low_confidence={k: np.array([np.asarray(r.low_confidence[k]) for r in recs]) for k in header.layers},
                 labels=tuple(r.label for r in recs), source=source)


def _dim_share(runtime: Any, site: str, stats: Any) -> float:
    """The mean token width (numbers per pixel token) of the tokens sent to ``site``, from the per-expert counters."""
    dims = {ls.layer: ls.dim for ls in stats.layers}
    num = den = 0
    for (layer, e), tokens in runtime.context.tokens.items():
        replicas = runtime.placement.sites_for(layer, e)
        chosen = runtime.local_site if runtime.local_site in replicas else replicas[0]  # as SplitRuntime chooses
        if chosen == site:
            num += tokens * dims[layer]
            den += tokens
    return num / den if den else 0.0


def _remote_layers_per_image(stats: Any, trace: Trace, placement: Placement, coordinator: str) -> float:
    """Mean number of MoE layers per image in which at least one patch goes to another site."""
    import numpy as np

    hits = np.zeros(trace.images)
    for ls in stats.layers:
        remote = np.array([coordinator not in placement.sites_for(ls.layer, e) for e in range(ls.num_experts)])
        hits += (trace.patches[ls.layer][:, remote].sum(axis=1) > 0)
    return float(hits.mean())


def format_report(r: EmulationReport) -> str:
    lines = [f"emulation of {r.topology} ({r.images} images of {r.data}), links scaled by {r.scale:.3g}:",
             "  " + ", ".join(f"{k}: {v['bandwidth_mbps']:.3g} Mbit/s, {v['latency_ms']:g} ms one way"
                              for k, v in r.links.items()),
             f"calibration: trunk {r.calibration.trunk_gflops:.2f} GFLOP/s, experts {r.calibration.expert_gflops:.2f} "
             f"GFLOP/s; loopback protocol {r.rpc_overhead_s * 1e3:.2f} ms per remote layer, {r.rpc_overhead_bytes} B "
             "per message",
             f"{'strategy':<12} {'measured ms':>12} {'simulated ms':>13} {'error':>8}  {'meas kB/img':>11} "
             f"{'sim kB/img':>10}"]
    for c in r.checks:
        ok = "ok" if abs(c.rel_error) <= TARGET_REL_ERROR else f"outside {TARGET_REL_ERROR:.0%}"
        mb = "" if c.measured_bytes_per_image is None else f"{c.measured_bytes_per_image / 1e3:>11.2f}"
        sb = "" if c.simulated_bytes_per_image is None else f"{c.simulated_bytes_per_image / 1e3:>10.2f}"
        lines.append(f"{c.strategy:<12} {c.measured_mean_ms:>12.2f} {c.simulated_mean_ms:>13.2f} "
                     f"{c.rel_error:>+8.1%}  {mb} {sb}  {ok}")
    return "\n".join(lines)
