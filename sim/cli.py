"""``moe-sim``: simulate a split-MoE deployment under many conditions (Ray), or check the simulator against the real
coordinator and workers on loopback with shaped links (``--emulate``).

    moe-sim --topology sites.yaml --out runs/sim                       # default sweep; profiles the model if needed
    moe-sim --topology sites.yaml --placement placement.yaml --stats stats.json --sweep sweep.yaml --out runs/sim
    moe-sim --topology sites.yaml --stats stats.json --address auto --out runs/sim      # on an existing Ray cluster
    moe-sim --emulate --topology sites.yaml --out runs/emu --images 40
    moe-sim --emulate --topology sites.yaml --sweep schedule.yaml --out runs/emu   # strategies under a link schedule

Every input is checked before anything runs; a mistake is one line on stderr, ``moe-sim: error: ...``, exit 2.
The sweep format, the model and the outputs are described in docs/sim.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from moevit.cli.runner import run_cli

__all__ = ["main"]

PROG = "moe-sim"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", required=True, help="sites.yaml (docs/topology.md)")
    ap.add_argument("--out", required=True, help="folder for results.csv, results.json and the plots")
    ap.add_argument("--placement", help="placement.yaml from moe-partition (default: the topology's, or the default)")
    ap.add_argument("--stats", help="stats.json from moe-profile (default: profile the topology's model now)")
    ap.add_argument("--trace", help="routing trace (JSONL, docs/sim.md) to replay instead of sampling the stats")
    ap.add_argument("--sweep", help="sweep.yaml (examples/sweep.yaml); default: a built-in sweep. With --emulate: "
                    "its settings.link_schedule, periodic arrival, images and strategies, run on the real system")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (overrides the sweep's)")
    ap.add_argument("--images", type=int, help="images per scenario (overrides the sweep's; --emulate: images "
                    "measured per strategy, default 30)")
    ap.add_argument("--data", help="dataset spec to profile the model on when --stats is not given "
                    "(default: digits for a digits model)")
    ap.add_argument("--address", help="join an existing Ray cluster (e.g. auto) instead of starting a local one")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")
    ap.add_argument("--no-ray", action="store_true", help="run the scenarios in this process, one by one")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    emu = ap.add_argument_group("emulation (--emulate)")
    emu.add_argument("--emulate", action="store_true",
                     help="run the real coordinator and workers on loopback with each link shaped by a local proxy, "
                          "and compare measured with simulated latency")
    emu.add_argument("--bandwidth-mbps", type=float, default=2.0,
                     help="scale the links so the fastest has this bandwidth (default 2 Mbit/s), keeping their ratios")
    emu.add_argument("--threads", type=int, default=1, help="torch threads of the coordinator and of each worker")
    return ap


def _simulate(args: argparse.Namespace) -> int:
    from moevit.sim.inputs import SimOptions, prepare

    opts = SimOptions(topology=args.topology, out=args.out, placement=args.placement, stats=args.stats,
                      trace=args.trace, sweep=args.sweep, seeds=args.seeds, images=args.images, data=args.data)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ValueError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    world, sweep, scenarios = prepare(opts, log=lambda s: print(f"{PROG}: {s}", file=sys.stderr))
    print(f"{PROG}: {len(scenarios)} scenarios ({len(world.topologies)} topologies x {len(sweep.conditions)} "
          f"conditions x {len(sweep.arrivals)} arrivals x {len(sweep.failures)} failure sets x "
          f"{len(sweep.seeds)} seeds x {len(sweep.strategies)} strategies), {sweep.images} images each; routing from "
          f"{'trace ' + world.trace.source if world.trace else 'stats ' + world.stats.source}", file=sys.stderr)
    t0 = time.perf_counter()
    progress = sys.stderr.isatty()
    if args.no_ray:
        from moevit.sim.sweep import run_local

        results = run_local(world, scenarios, progress=progress)
        where = "in-process"
    else:
        from moevit.sim.sweep import RaySession, run_sweep

        with RaySession(address=args.address, num_cpus=args.num_cpus or os.cpu_count()) as session:
            import ray

            cpus = int(ray.cluster_resources().get("CPU", 0))
            where = f"Ray ({'cluster ' + args.address if args.address else 'local'}, {cpus} CPUs" + \
                    (", started here)" if session.started else ")")
            results = run_sweep(world, scenarios, progress=progress)
    seconds = time.perf_counter() - t0
    from moevit.sim.report import plot_results, summary_table, write_results

    meta = {"topology": args.topology, "topologies": {n: t.path for n, t in world.topologies.items()},
            "placement": args.placement, "stats": world.stats.source, "stats_fingerprint": world.stats.fingerprint,
            "trace": world.trace.source if world.trace else None, "sweep": sweep.source,
            "settings": dataclasses.asdict(sweep.settings),
            "scenarios": len(scenarios), "seconds": seconds, "ran_on": where}
    csv_path, json_path = write_results(out, results, meta)
    print(summary_table(results))
    plots = [] if args.no_plots else plot_results(out, results)
    failed = sum(1 for r in results if r.error is not None and not r.error.startswith("does not fit"))
    misfit = sum(1 for r in results if r.error is not None and r.error.startswith("does not fit"))
    print(f"\n{len(results)} scenarios in {seconds:.1f} s on {where}; {failed} failed to run"
          + (f"; {misfit} not simulated: the model does not fit the site's memory" if misfit else ""))
    print(f"wrote {csv_path}, {json_path}" + "".join(f", {p.name}" for p in plots))
    return 0 if failed < len(results) - misfit or not failed else 1


def _emulate(args: argparse.Namespace) -> int:
    from moevit.sim.emulate import EmulationOptions, emulate, format_report

    if args.sweep is not None:  # a link schedule on the real system, strategies side by side, and the simulator
        from moevit.sim.emulate_schedule import ScheduleOptions, emulate_schedule, format_schedule_report

        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        record = emulate_schedule(ScheduleOptions(topology=args.topology, sweep=args.sweep, out=args.out,
                                                  placement=args.placement, data=args.data, threads=args.threads),
                                  log=lambda s: print(f"{PROG}: {s}", file=sys.stderr))
        print(format_schedule_report(record))
        print(f"wrote {Path(args.out) / 'emulation-schedule.json'}")
        return 0
    if not args.bandwidth_mbps > 0:
        raise ValueError(f"--bandwidth-mbps must be > 0, got {args.bandwidth_mbps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    opts = EmulationOptions(topology=args.topology, out=args.out, images=args.images or 30,
                            bandwidth_mbps=args.bandwidth_mbps, threads=args.threads, placement=args.placement,
                            data=args.data)
    report = emulate(opts, log=lambda s: print(f"{PROG}: {s}", file=sys.stderr))
    print(format_report(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "emulation.json"
    path.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # RuntimeError: the real system failed during --emulate (a worker did not start, an RPC failed): exit 1
    return run_cli(PROG, lambda: _emulate(args) if args.emulate else _simulate(args), failures=(RuntimeError,),
                   one_line=True)


if __name__ == "__main__":
    sys.exit(main())
