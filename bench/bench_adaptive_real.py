"""Adaptive vs local and offload-image on real processes while the link changes mid-run (issue 19, step 4, a first
real-process run; not the full emulation: no split workers, no simulator side by side, no energy).

    python bench/bench_adaptive_real.py --images 20          # -> bench/results/adaptive_real.json

The demo model (runs/demo/moe.safetensors, digits at 64 px) on examples/sites.yaml's sites, with the camera's
gflops set to 0.5 (a camera slower than the hub, so offload-image pays off on a good link) and every expert on the
camera (split is then local; it needs no worker). pi-north's whole-model Classify server runs as a real process
behind the link proxy (sim/linkproxy.py); the proxy's rate and delay follow 20 Mbit/s 4 ms, then --slow-mbps 50 ms,
then 20 Mbit/s 4 ms, --images images each, one image at a time. Per strategy and phase: p50/p95 latency, images per
strategy. Measured on the shared 2-core machine: every figure moves with its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from bench.common import load_average, percentile, write_result
except ImportError:  # run as a script from bench/
    from common import load_average, percentile, write_result

import torch
from moevit.coordinator.launcher import ensure_classify_server
from moevit.coordinator.local import free_port, health_status
from moevit.coordinator.strategies import open_runtime
from moevit.deploy.topology import AdaptiveOptions, OffloadOptions, Placement, load_topology
from moevit.sim.linkproxy import ThreadedLinkProxy

from moevit.data import open_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/moe.safetensors")
    ap.add_argument("--images", type=int, default=20, help="images per phase")
    ap.add_argument("--slow-mbps", type=float, default=0.05)
    ap.add_argument("--out", default="bench/results/adaptive_real.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_topology("examples/sites.yaml")
    cam = base.site(base.coordinator)
    sites = dict(base.sites)
    sites[cam.name] = dataclasses.replace(cam, device=dataclasses.replace(cam.device, gflops=0.5))
    from moevit.checkpoint import load_checkpoint

    placement = Placement({(layer, e): (cam.name,) for layer, m in load_checkpoint(args.model).moe_layers().items()
                           for e in range(m.num_experts)})
    port = free_port()
    serve_at = f"127.0.0.1:{port}"
    data = open_dataset("digits", image_size=64, split="eval")
    phases = [("20 Mbit/s 4 ms", 20.0, 4.0), (f"{args.slow_mbps:g} Mbit/s 50 ms", args.slow_mbps, 50.0),
              ("20 Mbit/s 4 ms", 20.0, 4.0)]
    images = [data.load(i)[0] for i in range(args.images * len(phases))]
    proxy = ThreadedLinkProxy(serve_at)
    proxied = proxy.start()
    results: dict[str, list[dict]] = {}
    summaries: list[dict] = []
    server = None
    try:
        for strategy in ("local", "offload-image", "adaptive"):
            topo = dataclasses.replace(base, sites=sites, model=Path(args.model).resolve(), strategy=strategy,
                                       offload=OffloadOptions(site="pi-north", address=proxied),
                                       adaptive=AdaptiveOptions(probe_interval_s=0.5),
                                       placement=placement)
            rt = open_runtime(topo)
            # every expert on the camera: split needs no worker (it is local here)
            if server is None:
                server = ensure_classify_server("examples/sites.yaml", "pi-north", serve_at, model=args.model,
                                                check=lambda t: health_status(serve_at, t))
            rows = []
            try:
                rt.check_workers()
                k = 0
                for name, mbps, ms in phases:
                    proxy.set_shaping(bandwidth_mbps=mbps, latency_ms=ms)
                    for _ in range(args.images):
                        t0 = time.perf_counter()
                        out = rt.classify(images[k][None])
                        rows.append({"phase": name, "latency_s": time.perf_counter() - t0, "strategy": out.strategy,
                                     "prediction": int(out.logits.argmax(1)[0])})
                        k += 1
                    if strategy == "adaptive":  # what the policy saw at the end of the phase
                        summaries.append({"phase": name, **rt.strategy_summary()})
            finally:
                rt.close()
            results[strategy] = rows
    finally:
        if server is not None:
            server.stop()
        proxy.stop()
    table = []
    for i, (name, _, _) in enumerate(phases):
        row = {"phase": name}
        for strategy, rows in results.items():
            lat = [r["latency_s"] for r in rows[i * args.images:(i + 1) * args.images]]
            used: dict[str, int] = {}
            for r in rows[i * args.images:(i + 1) * args.images]:
                used[r["strategy"]] = used.get(r["strategy"], 0) + 1
            row[strategy] = {"p50_s": statistics.median(lat), "p95_s": percentile(lat, 95), "used": used}
        table.append(row)
    whole = {s: {"p95_s": percentile([r["latency_s"] for r in rows], 95),
                 "mean_s": statistics.fmean(r["latency_s"] for r in rows)} for s, rows in results.items()}
    agree = {s: sum(a["prediction"] == b["prediction"] for a, b in zip(rows, results["local"], strict=True))
             / len(rows) for s, rows in results.items()}
    payload = {"what": "adaptive vs local and offload-image on real processes, link proxy schedule",
               "command": "python bench/bench_adaptive_real.py " + " ".join(sys.argv[1:]),
               "per_phase": table, "whole_run": whole, "agreement_with_local": agree, "load_average": load_average(),
               "adaptive_policy_at_phase_end": summaries, "images": results}
    path = write_result(args.out, payload)
    for row in table:
        print(row["phase"], {s: (round(v["p95_s"] * 1e3, 1), v["used"]) for s, v in row.items() if s != "phase"})
    print("whole run p95 ms", {s: round(v["p95_s"] * 1e3, 1) for s, v in whole.items()}, "agreement", agree)
    for sm in summaries:
        print(sm["phase"], sm["predicted_now"], sm["links"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
