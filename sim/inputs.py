"""Everything ``moe-sim`` reads, checked before any scenario runs: the topology (and the sweep's topology variants),
the placement, the routing statistics (or a fresh profile of the topology's model), an optional trace, the sweep.

:func:`prepare` turns :class:`SimOptions` into the shared :class:`~sim.engine.World` and the list of scenarios, or
raises a ``ValueError`` (TopologyError, StatsError, SimConfigError, TraceError) whose message is one line naming the
file and what is wrong: a sweep naming an unknown site or strategy, stats of another model than the topology's model
file, a trace of another model, a link with zero bandwidth, a placement that does not cover the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moevit.deploy.topology import (
    Placement,
    Topology,
    TopologyError,
    load_placement,
    load_topology,
    validate_placement,
)
from moevit.partition.costmodel import Stats, load_stats
from moevit.sim.config import (
    Scenario,
    SimConfigError,
    SweepConfig,
    check_sites,
    check_skip_layers,
    default_sweep,
    expand,
    load_sweep,
)
from moevit.sim.engine import Calibration, World
from moevit.sim.trace import Trace, check_trace, read_trace, record_trace, write_trace

__all__ = ["SimOptions", "check_fingerprint", "default_data", "prepare", "profile_model_file"]


@dataclass(frozen=True)
class SimOptions:
    """The simulator's inputs as the CLI received them (paths are strings; None = not given)."""

    topology: str
    out: str
    placement: str | None = None
    stats: str | None = None
    trace: str | None = None
    sweep: str | None = None
    seeds: int | None = None
    images: int | None = None
    data: str | None = None
    profile_images: int = 256


def default_data(model_path: Path) -> str | None:
    """The dataset to profile a model on when none is named: digits for a model trained on the 10 digits (the
    demo's), else None (the user must say)."""
    from moevit.checkpoint import read_config

    cfg = read_config(model_path)
    if cfg is not None and tuple(cfg.labels) == tuple(str(d) for d in range(10)):
        return "digits"
    return None


def profile_model_file(model_path: Path, data: str, out_dir: Path, *, images: int = 256,
                       log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Profile ``model_path`` on ``data`` (partition.profile, as ``moe-profile`` does) and record a routing trace of
    the same images; writes ``stats.json`` and ``trace.jsonl`` into ``out_dir``."""
    from moevit.partition.costmodel import save_stats
    from moevit.partition.profile import profile_model, select_images

    from moevit.checkpoint import load_checkpoint
    from moevit.data import open_dataset

    model = load_checkpoint(model_path)
    if not model.moe_layers():
        raise ValueError(f"{model_path}: a dense model (no MoE layers); the simulator needs a converted MoE model")
    dataset = open_dataset(data, image_size=model.config.image_size, split="eval", seed=0)
    log(f"profiling {model_path} on {dataset.describe()} ({images} images)")
    stats = profile_model(model, dataset, images=images, seed=0)
    stats["model_file"] = str(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_path = save_stats(stats, out_dir / "stats.json")
    chosen = select_images(len(dataset), images, 0)
    header, recs = record_trace(model, ((dataset[i][0], int(dataset[i][1])) for i in chosen))
    trace_path = write_trace(out_dir / "trace.jsonl", header, recs)
    log(f"wrote {stats_path} and {trace_path} (pass them as --stats / --trace next time)")
    return stats_path, trace_path


def check_fingerprint(topology: Topology, stats: Stats, stats_path: str) -> None:
    """Refuse stats of another model than the topology's model file (when that file exists)."""
    if topology.model is None or not topology.model.is_file():
        return
    from moevit.checkpoint_meta import checkpoint_fingerprint

    fp = checkpoint_fingerprint(topology.model)
    if fp != stats.fingerprint:
        raise SimConfigError(stats_path, "fingerprint",
                             f"profiled from model {stats.fingerprint}, but the topology's model {topology.model} is "
                             f"{fp}; run moe-profile on that model (or omit --stats to profile it now)")


def _placement_for(topology: Topology, stats: Stats, explicit: Placement | None) -> Placement:
    if topology.placement is not None:
        return topology.resolve_placement(stats.moe_layers())
    if explicit is not None and set(explicit.sites()) <= set(topology.sites):
        validate_placement(explicit, topology, stats.moe_layers())
        return explicit
    return topology.resolve_placement(stats.moe_layers())


def prepare(opts: SimOptions, *, log: Callable[[str], None] = print, calibration: Calibration | None = None
            ) -> tuple[World, SweepConfig, list[Scenario]]:
    """Load and check every input; raises ValueError (one line) on the first problem."""
    base = load_topology(opts.topology)
    if opts.seeds is not None and opts.seeds < 1:
        raise SimConfigError("--seeds", "", f"expected at least 1, got {opts.seeds}")
    if opts.images is not None and opts.images < 1:
        raise SimConfigError("--images", "", f"expected at least 1, got {opts.images}")
    sweep = load_sweep(opts.sweep) if opts.sweep else default_sweep()
    if opts.seeds is not None:
        sweep = dataclasses.replace(sweep, seeds=tuple(range(opts.seeds)))
    if opts.images is not None:
        sweep = dataclasses.replace(sweep, images=opts.images)
    topologies: dict[str, Topology] = {}
    for v in sweep.topologies:
        topologies[v.name] = load_topology(v.path)
    if not sweep.topologies:
        topologies["base"] = base
    check_sites(sweep, topologies)  # before profiling: a typo in the sweep should not cost a profile run

    trace_path = opts.trace
    stats_path = opts.stats
    if stats_path is None:
        if base.model is None:
            raise SimConfigError(opts.topology, "model", "no --stats and the topology names no model to profile: "
                                 "pass --stats stats.json (from moe-profile) or set model: in the topology")
        if not base.model.is_file():
            raise SimConfigError(opts.topology, "model", f"no --stats and the topology's model {base.model} does not "
                                 "exist: build it (make demo) or pass --stats stats.json (from moe-profile)")
        data = opts.data or default_data(base.model)
        if data is None:
            raise SimConfigError(opts.topology, "model", f"no --stats: profiling {base.model} needs a dataset; pass "
                                 "--data SPEC (digits | synthetic[:k=v,...] | folder:PATH | ssw60:PATH) or --stats")
        sp, tp = profile_model_file(base.model, data, Path(opts.out), images=opts.profile_images, log=log)
        stats_path = str(sp)
        if trace_path is None:
            trace_path = str(tp)
    stats = load_stats(stats_path)
    check_fingerprint(base, stats, stats_path)
    check_skip_layers(sweep, stats.moe_layers(), f"the stats {stats_path}")  # the trace's are checked equal below
    for topo in topologies.values():
        if topo is not base:
            check_fingerprint(topo, stats, stats_path)
        for link in topo.links:  # the loader refuses 0 already; a hand-built topology could still carry one
            if not link.bandwidth_mbps > 0:
                raise TopologyError(topo.path, f"links {link.a} <-> {link.b}", "zero bandwidth")
    trace: Trace | None = None
    if trace_path is not None:
        trace = read_trace(trace_path)
        check_trace(trace, stats.moe_layers(), stats.fingerprint)
    explicit = None
    if opts.placement is not None:
        explicit = load_placement(opts.placement, known_sites=base.sites, sites_from=opts.topology)
        validate_placement(explicit, base, stats.moe_layers())
    placements: dict[str, Placement] = {}
    for name, topo in topologies.items():
        if explicit is not None and topo is base:
            placements[name] = explicit
        else:
            placements[name] = _placement_for(topo, stats, explicit)
        for site in placements[name].sites():
            if site != topo.coordinator and topo.link_between(topo.coordinator, site) is None:
                raise TopologyError(topo.path, f"sites.{site}", "holds experts but has no direct link to the "
                                    f"coordinator {topo.coordinator!r}")
    world = World(topologies=topologies, placements=placements, stats=stats, trace=trace, calibration=calibration)
    scenarios = expand(sweep, list(topologies))
    return world, sweep, scenarios
