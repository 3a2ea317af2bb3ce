"""The camera side on onnxruntime (fp32, int8) vs torch fp32, side by side in one run.

1. camera-side forward (folded trunk + routers: the segments between the dispatch points) of the seeded random MoE
   [1,3,5,7] of ``bench_split.py`` at 256 px, batch 1 and 8, one and two threads: torch fp32, onnxruntime fp32,
   onnxruntime int8 (static quantisation calibrated on synthetic images), interleaved rounds, medians. Each forward
   is the whole image in-process (experts run by the model's in-process dispatcher between the segments); the
   segments' own time is timed around their calls.
2. the expert call at 64 tokens: the worker's torch backend vs its onnxruntime backend in fp32 and int8 (dynamic, the
   default, and static calibrated on the expert's tokens).
3. the whole-image latency split over loopback (3 torch workers, every expert remote, fp16 on the wire), batch 1,
   one camera thread, per camera backend (``--split``; the workers start on the same 2 cores).
4. energy per image in the simulator (examples/sites.yaml, local-moe and split) with the camera's compute speed
   recomputed from the measured batch-1 one-thread times of each backend.

Run: ``nice -n 5 .venv/bin/python bench/bench_onnx_camera.py [--rounds 15] [--no-split]`` (a few minutes; writes
``bench/results/onnx_camera.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import load_average, summarize, write_result  # noqa: E402

LAYERS = (1, 3, 5, 7)
CALIBRATE = "synthetic:classes=10,per_class=8,size=256,seed=0"
BACKENDS = ("torch_fp32", "ort_fp32", "ort_int8")
TARGETS = {"ort_int8_vs_torch": 0.5, "ort_fp32_vs_torch": 0.8, "expert_int8_vs_torch": 0.5}


def _interleaved(fns: dict[str, Callable[[], float | tuple[float, float]]], rounds: int, warmup: int = 2
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin (rotating start) timing of ``fns``; each returns the seconds its segments took, or (wall, CPU)
    seconds of them -> (total ms, segment ms, segment CPU ms) per name. CPU time is the process's (all threads):
    on a loaded machine it leaves out the time the process waited for a core, which wall time counts."""
    names = list(fns)
    total: dict[str, list[float]] = {n: [] for n in names}
    seg: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            s = fns[n]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                total[n].append(dt * 1e3)
                wall_s, cpu_s = s if isinstance(s, tuple) else (s, dc)
                seg[n].append(wall_s * 1e3)
                cpu[n].append(cpu_s * 1e3)
    return total, seg, cpu


def bench_camera(model, fp: str, cache: Path, size: int, rounds: int, log: Callable[[str], None],
                 configs: list[tuple[int, int]]) -> dict[str, Any]:
    import torch

    from bench.bench_split import random_images
    from moevit.onnx_camera import OnnxCamera, OnnxCameraConfig
    from moevit.segments import CameraProgram

    program = CameraProgram(model)
    cams: dict[tuple[str, int], Any] = {}
    for threads in sorted({t for t, _ in configs}):
        for precision in ("fp32", "int8"):
            t0 = time.perf_counter()
            cfg = OnnxCameraConfig(cache, precision=precision, threads=threads,
                                   calibrate=CALIBRATE if precision == "int8" else None, calibrate_images=32)
            cams[(precision, threads)] = OnnxCamera(model, fp, size, cfg)
            log(f"{cams[(precision, threads)].describe()} in {time.perf_counter() - t0:.1f} s")
    xs = random_images(8, size, seed=3)
    with torch.no_grad():
        ref = model(xs)
        agree = {}
        for (precision, threads), cam in cams.items():
            if threads == 1:
                out = cam(xs)
                agree[f"ort_{precision}"] = {"max_abs_logit_diff": float((out - ref).abs().max()),
                                             "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean())}
    out: dict[str, Any] = {"agreement_vs_torch_random_images": agree, "configs": {}}

    def timed(runner: Callable[[Any, tuple], Any]) -> Callable[[Any], Callable[[], float]]:
        def make(x):
            def call() -> tuple[float, float]:
                spent = [0.0, 0.0]

                def seg_fn(seg, inputs):
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = runner(seg, inputs)
                    spent[0] += time.perf_counter() - t0
                    spent[1] += time.process_time() - c0
                    return res

                with torch.inference_mode():
                    program.run(x, seg_fn)
                return spent[0], spent[1]
            return call
        return make

    for threads, batch in configs:
        torch.set_num_threads(threads)
        x = xs[:batch]
        fns = {"torch_fp32": timed(lambda seg, inputs: seg(*inputs))(x),
               "ort_fp32": timed(cams[("fp32", threads)].run_segment)(x),
               "ort_int8": timed(cams[("int8", threads)].run_segment)(x)}
        n = rounds if batch == 1 else max(3, rounds // 3)
        total, seg, cpu = _interleaved(fns, n)
        key = f"threads{threads}_batch{batch}"
        t_seg = {k: statistics.median(v) for k, v in seg.items()}
        c_seg = {k: statistics.median(v) for k, v in cpu.items()}
        t_tot = {k: statistics.median(v) for k, v in total.items()}
        out["configs"][key] = {
            "threads": threads, "batch": batch, "rounds": n,
            "camera_side_ms": {k: summarize(v) for k, v in seg.items()},
            "whole_image_in_process_ms": {k: summarize(v) for k, v in total.items()},
            "ratio_camera_side_vs_torch": {k: round(t_seg[k] / t_seg["torch_fp32"], 4) for k in BACKENDS},
            # process CPU time: robust to a loaded machine; comparable across backends at one thread only
            # (onnxruntime's extra threads spin while they wait, torch's sleep: OMP_WAIT_POLICY=PASSIVE)
            "camera_side_cpu_ms": {k: summarize(v) for k, v in cpu.items()},
            "ratio_camera_side_cpu_vs_torch": {k: round(c_seg[k] / c_seg["torch_fp32"], 4) for k in BACKENDS},
            "ratio_whole_in_process_vs_torch": {k: round(t_tot[k] / t_tot["torch_fp32"], 4) for k in BACKENDS},
        }
        r = out["configs"][key]["ratio_camera_side_vs_torch"]
        log(f"{key}: camera side torch {t_seg['torch_fp32']:.1f} ms, ort fp32 {t_seg['ort_fp32']:.1f} ms "
            f"({r['ort_fp32']:.3f}x), ort int8 {t_seg['ort_int8']:.1f} ms ({r['ort_int8']:.3f}x); whole image in "
            f"process {t_tot['torch_fp32']:.1f} / {t_tot['ort_fp32']:.1f} / {t_tot['ort_int8']:.1f} ms; CPU time of "
            f"the camera side {c_seg['torch_fp32']:.1f} / {c_seg['ort_fp32']:.1f} / {c_seg['ort_int8']:.1f} ms")
    torch.set_num_threads(1)
    return out


def bench_expert(model, fp: str, cache: Path, rounds: int) -> dict[str, Any]:
    """One expert call at 64 tokens: the worker's backends, torch vs onnxruntime fp32 vs int8."""
    import torch
    from moevit.worker.backends import OnnxBackend, TorchBackend

    from bench.bench_split import random_images
    from moevit.onnx_camera import calibration_key, expert_tokens

    torch.set_num_threads(1)
    layer = LAYERS[-1]
    bank = model.moe_layers()[layer].experts
    banks = {layer: bank.subset(list(bank.expert_ids))}
    tokens = expert_tokens(model, random_images(16, 256, seed=5))
    calib = {k: v for k, v in tokens.items() if k[0] == layer}
    backends = {"torch": TorchBackend(banks),
                "ort_fp32": OnnxBackend(banks, fp, cache, threads=1),
                "ort_int8": OnnxBackend(banks, fp, cache, threads=1, precision="int8"),  # dynamic, the default
                "ort_int8_static": OnnxBackend(banks, fp, cache, threads=1, precision="int8", calibration=calib,
                                               calibration_key=calibration_key("random-images-16", 16))}
    experts = [e for e in bank.expert_ids if (layer, e) in calib]
    # real tokens of each expert (its own calibration distribution), 64 rows
    xs = {e: calib[(layer, e)][:64].contiguous() if len(calib[(layer, e)]) >= 64
          else calib[(layer, e)].repeat(64 // len(calib[(layer, e)]) + 1, 1)[:64].contiguous() for e in experts}
    calls = 50
    diff = {k: max(float((b.run(layer, e, xs[e]) - backends["torch"].run(layer, e, xs[e])).abs().max())
                   for e in experts) for k, b in backends.items() if k != "torch"}

    def many(b) -> Callable[[], float]:
        def run() -> float:
            for k in range(calls):
                e = experts[k % len(experts)]
                b.run(layer, e, xs[e])
            return 0.0
        return run

    total, _, cpu = _interleaved({k: many(b) for k, b in backends.items()}, rounds)
    us = {k: [t * 1e3 / calls for t in v] for k, v in total.items()}
    med = {k: statistics.median(v) for k, v in us.items()}
    cpu_us = {k: [t * 1e3 / calls for t in v] for k, v in cpu.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_us.items()}
    return {"tokens": 64, "layer": layer, "dim": bank.dim, "hidden": bank.hidden, "threads": 1,
            "calls_per_sample": calls, "rounds": rounds, "us_per_call": {k: summarize(v) for k, v in us.items()},
            "ratio_vs_torch": {k: round(med[k] / med["torch"], 4) for k in med},
            "cpu_us_per_call": {k: summarize(v) for k, v in cpu_us.items()},
            "ratio_cpu_vs_torch": {k: round(cpu_med[k] / cpu_med["torch"], 4) for k in cpu_med},
            "max_abs_diff_vs_torch": diff}


def bench_split_latency(model_path: Path, fp_cache: Path, size: int, rounds: int, log) -> dict[str, Any]:
    """Batch-1 whole-image latency split over loopback per camera backend (3 torch workers, every expert remote)."""
    import torch
    from moevit.coordinator.runtime import SplitRuntime
    from moevit.deploy.topology import load_topology

    from bench.bench_split import NUM_EXPERTS, Deployment, random_images
    from moevit.onnx_camera import OnnxCameraConfig

    torch.set_num_threads(1)
    xs = random_images(8, size, seed=4)
    with tempfile.TemporaryDirectory() as tmp, Deployment(Path(tmp), model_path, LAYERS, NUM_EXPERTS,
                                                            worker_cpus=None) as dep:
        runtimes = {}
        configs = {"torch_fp32": None, "ort_fp32": OnnxCameraConfig(fp_cache),
                   "ort_int8": OnnxCameraConfig(fp_cache, precision="int8", calibrate=CALIBRATE,
                                                calibrate_images=32)}
        try:
            for name, cfg in configs.items():
                rt = SplitRuntime.from_topology(load_topology(dep.topology("3w")), wire="fp16", onnx=cfg,
                                                image_size=size)
                rt.check_workers()
                runtimes[name] = rt
            k = [0]

            def call(rt) -> Callable[[], float]:
                def run() -> float:
                    k[0] += 1
                    rt.classify(xs[k[0] % len(xs)][None])
                    return 0.0
                return run

            total, _, _ = _interleaved({n: call(rt) for n, rt in runtimes.items()}, rounds)
        finally:
            for rt in runtimes.values():
                rt.close()
    med = {k: statistics.median(v) for k, v in total.items()}
    log("split over loopback, batch 1: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()))
    return {"workers": 3, "placement": "3w (every expert remote)", "wire": "fp16", "rounds": rounds,
            "ms": {k: summarize(v) for k, v in total.items()},
            "ratio_vs_torch": {k: round(med[k] / med["torch_fp32"], 4) for k in med}}


def energy(camera: dict[str, Any]) -> dict[str, Any]:
    """The simulator's energy per image on the camera site with its compute speed from each backend's measured
    batch-1 one-thread time (trunk = the segments; experts = the rest of the in-process forward, torch's)."""
    from moevit.deploy.topology import default_placement, load_topology
    from moevit.partition.costmodel import FLOPS_PER_MAC, parse_stats, synthetic_stats
    from moevit.sim.config import Arrival, FailureSet, LinkCondition, Scenario, Settings
    from moevit.sim.engine import Calibration, World, run_scenario

    topo = load_topology(REPO_ROOT / "examples" / "sites.yaml")
    stats = parse_stats(synthetic_stats(layers=LAYERS, num_experts=16, num_classes=10, image_size=256, seed=0),
                        "<bench stats>")
    expert_macs = sum(ls.patches * stats.top_k * stats.pixels_per_patch * ls.expert_macs_per_token
                      for ls in stats.layers)
    c = camera["configs"]["threads1_batch1"]
    t_exp = (c["whole_image_in_process_ms"]["torch_fp32"]["p50"] - c["camera_side_ms"]["torch_fp32"]["p50"]) / 1e3
    out: dict[str, Any] = {"topology": "examples/sites.yaml", "stats": "synthetic_stats([1,3,5,7], 16 experts, 256 px)",
                           "coordinator": topo.coordinator, "strategies": {}}
    for backend in BACKENDS:
        t_trunk = c["camera_side_ms"][backend]["p50"] / 1e3
        cal = Calibration(trunk_gflops=stats.trunk_macs * FLOPS_PER_MAC / t_trunk / 1e9,
                          expert_gflops=expert_macs * FLOPS_PER_MAC / max(t_exp, 1e-6) / 1e9,
                          how=f"bench_onnx_camera {backend}, batch 1, one thread")
        world = World(topologies={"base": topo}, placements={"base": default_placement(topo, stats.moe_layers())},
                      stats=stats, calibration=cal)
        for strategy in ("local-moe", "split"):
            sc = Scenario("base", LinkCondition(), Arrival("poisson-1hz", "poisson", rate_hz=1.0), FailureSet(),
                          strategy, 0, 200, Settings())
            res = run_scenario(world, sc)
            site = res.sites[topo.coordinator]
            out["strategies"].setdefault(strategy, {})[backend] = {
                "camera_energy_j_per_image": site.energy_j_per_image,
                "camera_active_j_per_image": site.active_j_per_image, "latency_p50_ms": res.latency_p50_s * 1e3,
                "trunk_gflops": cal.trunk_gflops}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds at batch 1 (batch 8: a third)")
    ap.add_argument("--no-split", action="store_true", help="skip the split-over-loopback latency (3 workers)")
    ap.add_argument("--configs", default="1x1,1x8,2x1,2x8", help="THREADSxBATCH camera configurations timed "
                    "(default all four; 1x1 is the target's)")
    ap.add_argument("--expert-only", action="store_true", help="only the expert call at 64 tokens")
    ap.add_argument("--camera-only", action="store_true", help="only the camera-side timing (no expert call, "
                    "energy or split)")
    ap.add_argument("--out", default="bench/results/onnx_camera.json")
    args = ap.parse_args(argv)
    # Torch's OpenMP threads spin after each op by default; on a shared 2-core machine a two-thread torch forward
    # then stalls whenever one of its threads is descheduled (seconds per image in a trial run). Passive waiting
    # (as the benchmarks' workers run) keeps the torch figures honest there; set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from bench.bench_split import IMAGE_SIZE, build_model
    from moevit.checkpoint import model_fingerprint, save_checkpoint
    from moevit.fuse import folded_copy

    log = lambda s: print(s, flush=True)  # noqa: E731
    torch.set_num_threads(1)
    model = build_model(LAYERS)
    fp = model_fingerprint(model)
    folded = folded_copy(model)
    result: dict[str, Any] = {"benchmark": "onnx_camera", "loadavg_before": load_average(),
                              "settings": {"layers": list(LAYERS), "image_size": IMAGE_SIZE, "model": "bench_split "
                                           "seeded random MoE, BatchNorms folded", "calibrate": CALIBRATE,
                                           "calibrate_images": 32, "rounds": args.rounds,
                                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                              "targets": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "onnx-cache"
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        if args.expert_only:
            result["expert_call"] = bench_expert(folded, fp, cache, args.rounds)
            e = result["expert_call"]
            log(f"expert call, 64 tokens, of torch: wall {e['ratio_vs_torch']}, CPU {e['ratio_cpu_vs_torch']} "
                f"({ {k: round(v['p50'], 1) for k, v in e['cpu_us_per_call'].items()} } us CPU)")
            result["loadavg_after"] = load_average()
            log(f"written {write_result(args.out, result)}")
            return 0
        result["camera"] = bench_camera(folded, fp, cache, IMAGE_SIZE, args.rounds, log, configs)
        if args.camera_only:
            result["loadavg_after"] = load_average()
            log(f"written {write_result(args.out, result)}")
            return 0
        result["expert_call"] = bench_expert(folded, fp, cache, args.rounds)
        log(f"expert call, 64 tokens: {result['expert_call']['ratio_vs_torch']} of torch "
            f"({ {k: round(v['p50'], 1) for k, v in result['expert_call']['us_per_call'].items()} } us)")
        result["energy"] = energy(result["camera"])
        for strategy, per in result["energy"]["strategies"].items():
            log(f"energy per image on the camera, {strategy}: " + ", ".join(
                f"{k} {v['camera_energy_j_per_image']:.4f} J" for k, v in per.items()))
        if not args.no_split:
            path = save_checkpoint(model, Path(tmp) / "moe.safetensors")
            try:
                result["split"] = bench_split_latency(path, Path(tmp) / "split-cache", IMAGE_SIZE,
                                                      args.rounds, log)
            except Exception as e:  # a worker that would not start must not lose the figures above
                result["split"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"split latency not measured: {e}")
    c = result["camera"]["configs"]["threads1_batch1"]["ratio_camera_side_vs_torch"]
    result["verdict"] = {"ort_int8_vs_torch_b1_t1": c["ort_int8"], "ort_fp32_vs_torch_b1_t1": c["ort_fp32"],
                         "int8_target_met": c["ort_int8"] <= TARGETS["ort_int8_vs_torch"],
                         "fp32_target_met": c["ort_fp32"] <= TARGETS["ort_fp32_vs_torch"],
                         "expert_int8_vs_torch": result["expert_call"]["ratio_vs_torch"]["ort_int8"],
                         "expert_target_met": result["expert_call"]["ratio_vs_torch"]["ort_int8"]
                         <= TARGETS["expert_int8_vs_torch"],
                         # the same ratios in CPU time (what a loaded machine leaves comparable; docs/onnx.md)
                         "cpu_ort_int8_vs_torch_b1_t1": result["camera"]["configs"]["threads1_batch1"][
                             "ratio_camera_side_cpu_vs_torch"]["ort_int8"],
                         "cpu_expert_int8_vs_torch": result["expert_call"]["ratio_cpu_vs_torch"]["ort_int8"]}
    result["loadavg_after"] = load_average()
    path = write_result(args.out, result)
    log(f"verdict: {result['verdict']}\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
