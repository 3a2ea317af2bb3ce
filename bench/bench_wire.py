#!/usr/bin/env python3
"""The wire: top-1 against bytes per image for every token codec x skip threshold, bytes per 256-px image beside
its JPEG (quality 90), codec CPU per layer per site, and the simulator's link-class table before and after.

    nice -n 5 .venv/bin/python bench/bench_wire.py \\
        --models runs/wire-digits/s0/moe.safetensors runs/wire-digits/s1/moe.safetensors \\
                 runs/wire-digits/s2/moe.safetensors --data digits --image-size 32

(the models: ``bench/wire_models.py --data digits --epochs 4 --out runs/wire-digits``). Writes
``bench/results/wire.json`` and ``bench/results/wire.png``.

How each figure is measured:

* **Accuracy and bytes** run the model in-process with the coordinator's dispatch emulated: every MoE layer's
  patches go to their experts' sites under the default placement of ``--topology`` (what SplitRuntime sends, one
  packed tensor per remote site and layer); a remote site's tokens are encoded with the codec
  (``moevit_rpc.tensors.tensor_to_proto``, the worker's and coordinator's own code), decoded, run through the
  experts, and the outputs encoded and decoded again, so the accuracy includes both directions' quantisation.
  Skipping is the model's own :class:`moevit.moe.skip.SkippingDispatcher` (action residual). Bytes per image =
  the token payload (data + scales) both ways + ``--rpc-overhead`` bytes per message (89 B measured through link
  proxies in bench_sim's emulation). Top-1 on the eval split, per seed; the difference to fp32 on the wire is
  paired (same model, same images).
* **JPEG at the models' size**: bytes per image over the mean JPEG (q90) of the same eval inputs
  (``ratio_to_jpeg_model_size``): with models trained at 256 px this is the 256-px figure over every eval image and
  seed, their routers deciding at their own size.
* **256 px**: the first model run on ``--bytes-data`` images at 256 px (its routing and tokens at that size; its
  accuracy there is not claimed: it was trained at ``--image-size``), each image's bytes per codec x threshold
  beside the JPEG (quality 90, PIL) of the same 256-px input.
* **CPU**: per MoE layer, the tokens of the remote site with the most of them in a 256-px image: encode + decode
  out, and encode + decode of the outputs back (the four codec steps of one layer on one site), one thread,
  median of ``--cpu-rounds``.
* **Links**: ``moe-sim``'s engine on ``examples/sites.yaml`` with every remote link set to one class (as in
  docs/sim.md), synthetic 256-px routing statistics, fp16 (before) and the best codec with its measured bytes per
  number and CPU (after), beside offload-image.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moevit.deploy.topology import default_placement, load_topology  # noqa: E402

from bench.common import machine_info, write_result  # noqa: E402
from moevit.checkpoint import load_checkpoint  # noqa: E402
from moevit.data import denormalize, open_dataset  # noqa: E402
from moevit.fuse import fold_batchnorm  # noqa: E402
from moevit.moe.dispatcher import Dispatcher  # noqa: E402
from moevit.moe.skip import SkippingDispatcher, rules_from_options, rules_per_layer  # noqa: E402
from moevit_rpc import codecs  # noqa: E402
from moevit_rpc.tensors import proto_to_tensor, tensor_to_proto  # noqa: E402

BASES = ("fp32", "fp16", "bf16", "int8", "int4")


class Meter:
    """Bytes both ways and RPC messages, per forward (reset by the caller)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0
        self.remote_tokens: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.largest: dict[int, torch.Tensor] = {}


class WireEmulator(Dispatcher):
    """Experts of ``site_of`` != ``local`` behind the codec: one packed tensor per site, both directions."""

    def __init__(self, bank, site_of: dict[int, str], local: str, codec: str, meter: Meter, *,
                 keep_largest: bool = False) -> None:
        self.bank, self.site_of, self.local, self.codec, self.meter = bank, site_of, local, codec, meter
        self.keep_largest = keep_largest

    def compute(self, layer_id, plan):
        chunks = plan.chunks()
        outs: list[torch.Tensor | None] = [None] * len(plan.experts)
        by_site: dict[str, list[int]] = defaultdict(list)
        for pos, e in enumerate(plan.experts):
            if self.site_of[e] == self.local:
                outs[pos] = self.bank.forward_one(e, chunks[pos])
            else:
                by_site[self.site_of[e]].append(pos)
        for site, ps in by_site.items():
            x = torch.cat([chunks[p] for p in ps])
            up = tensor_to_proto(x, self.codec)
            xd = proto_to_tensor(up)
            ys = [self.bank.forward_one(plan.experts[p], part)
                  for p, part in zip(ps, torch.split(xd, [len(chunks[p]) for p in ps]), strict=True)]
            down = tensor_to_proto(torch.cat(ys), self.codec)
            yd = proto_to_tensor(down)
            for p, y in zip(ps, torch.split(yd, [len(chunks[p]) for p in ps]), strict=True):
                outs[p] = y
            self.meter.bytes += len(up.data) + len(up.scales) + len(down.data) + len(down.scales)
            self.meter.messages += 2
            self.meter.remote_tokens[layer_id][site] += len(x)
            if self.keep_largest and len(x) > len(self.meter.largest.get(layer_id, torch.empty(0))):
                self.meter.largest[layer_id] = x.clone()
        return outs


def install(model, topology, codec: str, threshold: float, meter: Meter, keep_largest: bool = False,
            skip_layers: set[int] | None = None, background: str | None = None) -> None:
    """Emulated dispatch on ``model``; with ``threshold`` > 0 the coordinator's own skip rule
    (``rules_from_options``: ``--skip-threshold``, ``--skip-background``, ``--skip-layers``) keeps patches off the
    wire. Threshold 0 skips nothing (the reference), background experts included."""
    rules = rules_from_options(threshold=threshold, analysis=background, layers=skip_layers) if threshold > 0 else {}
    rules = rules_per_layer(rules, model.moe_layers())  # ValueError naming a layer that is not a MoE layer
    placement = default_placement(topology, {i: m.num_experts for i, m in model.moe_layers().items()})
    local = topology.coordinator
    for layer_id, layer in model.moe_layers().items():
        site_of = {e: placement.sites_for(layer_id, e)[0] for e in range(layer.num_experts)}
        emu = WireEmulator(layer.experts, site_of, local, codec, meter, keep_largest=keep_largest)
        remote = [e for e, s in site_of.items() if s != local]
        rule = rules.get(layer_id)
        layer.set_dispatcher(SkippingDispatcher(emu, rule, remote=remote) if rule is not None else emu)


@torch.no_grad()
def evaluate(model, topology, data, codec: str, threshold: float, overhead: int, batch: int = 128,
             skip_layers: set[int] | None = None, background: str | None = None):
    meter = Meter()
    install(model, topology, codec, threshold, meter, skip_layers=skip_layers, background=background)
    correct, preds, n = 0, [], 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    for x, y in loader:
        p = model(x).argmax(1)
        correct += int((p == y).sum())
        preds.append(p)
        n += len(y)
    return correct / n, torch.cat(preds), (meter.bytes + overhead * meter.messages) / n


def jpeg_bytes(x: torch.Tensor, quality: int = 90) -> int:
    from PIL import Image

    img = (denormalize(x).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def codec_cpu_ms(tokens: dict[int, torch.Tensor], rounds: int, names) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in names:
        out[name] = {}
        for layer, x in sorted(tokens.items()):
            def once(x=x, name=name):
                up = proto_to_tensor(tensor_to_proto(x, name))
                proto_to_tensor(tensor_to_proto(up, name))  # the outputs back (same shape and spread)
            once()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                once()
                times.append((time.perf_counter() - t0) * 1e3)
            out[name][str(layer)] = round(statistics.median(times), 4)
    return out


def link_table(variants: list[tuple[str, dict]]) -> list[dict]:
    """The simulator's link classes (docs/sim.md) for each (label, sim settings) of ``variants``."""
    import json

    import yaml
    from moevit.partition.costmodel import synthetic_stats
    from moevit.sim.inputs import SimOptions, prepare
    from moevit.sim.sweep import run_local

    work = Path("runs/wire")
    work.mkdir(parents=True, exist_ok=True)
    stats_path = work / "stats256.json"
    stats_path.write_text(json.dumps(synthetic_stats(layers=(1, 5, 8), num_experts=16, num_classes=8,
                                                     image_size=256)))
    # the sites of examples/sites.yaml without its model file: the statistics are synthetic, of no model on disk
    topology = yaml.safe_load(Path("examples/sites.yaml").read_text())
    topology.pop("model", None)
    topology_path = work / "sites-synthetic.yaml"
    topology_path.write_text(yaml.safe_dump(topology))
    rows = []
    conditions = [
        {"name": "wifi-20M", "bandwidth_mbps": 20, "latency_ms": 4, "loss": 0.0},
        {"name": "halow-2M", "bandwidth_mbps": 2, "latency_ms": 10, "loss": 0.01, "tx_nj_per_bit": 200,
         "rx_nj_per_bit": 100},
        {"name": "ltem-0.3M", "bandwidth_mbps": 0.3, "latency_ms": 50, "loss": 0.01, "tx_nj_per_bit": 1000,
         "rx_nj_per_bit": 300},
        {"name": "lora-50k-dc100", "bandwidth_mbps": 0.05, "latency_ms": 100, "loss": 0.05, "tx_nj_per_bit": 2400,
         "rx_nj_per_bit": 800, "packet_bytes": 222},
    ]
    arrivals = [{"name": "trap-5-per-10s", "kind": "bursty", "burst_size": 5, "burst_gap_s": 0.5, "idle_s": 10},
                {"name": "trap-5-per-10min", "kind": "bursty", "burst_size": 5, "burst_gap_s": 0.5, "idle_s": 600}]
    for label, settings in variants:
        sweep_path = work / f"sweep-{label.replace('@', '-at-')}.yaml"
        sweep_path.write_text(yaml.safe_dump({
            "conditions": conditions, "arrivals": arrivals, "seeds": 2, "images": 200,
            "strategies": ["offload-image", "split"], "settings": {**settings, "rpc_overhead_bytes": 89}}))
        world, _, scenarios = prepare(SimOptions(topology=str(topology_path), out=str(work), stats=str(stats_path),
                                                 sweep=str(sweep_path)), log=lambda s: None)
        for r in run_local(world, scenarios):
            row = r.row()
            rows.append({"wire": label, "condition": row["condition"], "arrival": row["arrival"],
                         "strategy": row["strategy"], "seed": row["seed"],
                         "kB_per_image": row["bytes_per_image"] / 1e3,
                         "latency_mean_s": row["latency_mean_s"], "latency_p95_s": row["latency_p95_s"],
                         "wait_mean_s": row["wait_mean_s"], "failed": row["failed"], "arrived": row["arrived"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--topology", default="examples/sites.yaml")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--bytes-data", default="scenes:classes=4,per_class=12,size=256")
    ap.add_argument("--bytes-images", type=int, default=24)
    ap.add_argument("--rpc-overhead", type=int, default=89)
    ap.add_argument("--cpu-rounds", type=int, default=200)
    ap.add_argument("--skip-layers", type=int, nargs="+", default=None,
                    help="apply the skip threshold only at these MoE layers (default: all)")
    ap.add_argument("--codecs", nargs="+", default=list(codecs.CODEC_NAMES), choices=codecs.CODEC_NAMES,
                    help="codecs to measure (default: all); fp32 at threshold 0, the reference, is always run")
    ap.add_argument("--skip-background", nargs="+", default=None, metavar="ANALYSIS_JSON",
                    help="moe-analyze's analysis.json, one per --models entry: at every threshold > 0 the patches of "
                    "each layer's background experts stay off the wire too (a threshold under 1/E, e.g. 0.01, "
                    "then skips the background experts only)")
    ap.add_argument("--no-links", action="store_true")
    ap.add_argument("--out", default="bench/results/wire.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    topology = load_topology(args.topology)
    skip_layers = None if args.skip_layers is None else set(args.skip_layers)
    if args.skip_background is not None and len(args.skip_background) != len(args.models):
        ap.error(f"--skip-background: {len(args.skip_background)} file(s) for {len(args.models)} model(s); give one "
                 "analysis.json per model, in the same order")
    background_of = dict(zip(args.models, args.skip_background or [], strict=False))
    names = ["fp32", *(c for c in args.codecs if c != "fp32")]  # fp32 first: the reference of every difference
    args.thresholds = sorted({0.0, *args.thresholds})  # 0 first, with fp32 the reference
    t_start = time.perf_counter()

    # ---- accuracy and bytes at the models' size, every codec x threshold, per seed
    acc: dict[str, dict] = {}
    jpeg_model_size: float | None = None
    for path in args.models:
        model = load_checkpoint(path).eval()
        fold_batchnorm(model)
        if skip_layers is not None:
            try:
                rules_per_layer(dict.fromkeys(skip_layers), model.moe_layers())
            except ValueError as e:
                ap.error(f"--skip-layers: {path}: {e}")
        data = open_dataset(args.data, image_size=args.image_size, split="eval", seed=0)
        if jpeg_model_size is None:  # the JPEG (q90) of each eval input at the models' size: what offload would send
            jpeg_model_size = statistics.mean(jpeg_bytes(data[i][0]) for i in range(len(data)))
        per: dict[str, dict] = {}
        ref_pred = None
        for t in args.thresholds:
            for name in names:
                top1, pred, bpi = evaluate(model, topology, data, name, t, args.rpc_overhead, skip_layers=skip_layers,
                                           background=background_of.get(path))
                if name == "fp32" and t == 0:
                    ref_pred = pred
                per[f"{name}@{t:g}"] = {"codec": name, "threshold": t, "top1": top1, "bytes_per_image": bpi,
                                        "agreement_with_fp32": float((pred == ref_pred).float().mean())
                                        if ref_pred is not None else None}
                print(f"{Path(path).parent.name} {name:10s} t={t:g} top1={top1:.4f} bytes/img={bpi:.0f} "
                      f"({bpi / jpeg_model_size:.2f}x its JPEG)", flush=True)
        acc[path] = per

    # ---- 256 px: bytes per image beside the JPEG, and the tokens for the CPU figures
    model = load_checkpoint(args.models[0]).eval()
    fold_batchnorm(model)
    images = open_dataset(args.bytes_data, image_size=256, split="eval", seed=0)
    # spread over the split (its files are ordered by class), not its first items
    picks = np.unique(np.linspace(0, len(images) - 1, min(args.bytes_images, len(images))).round().astype(int))
    xs = torch.stack([images[int(i)][0] for i in picks])
    jpeg = [jpeg_bytes(x) for x in xs]
    bytes256: dict[str, dict] = {}
    largest: dict[int, torch.Tensor] = {}
    for t in args.thresholds:
        for name in names:
            meter = Meter()
            install(model, topology, name, t, meter, keep_largest=(name == "fp32" and t == 0), skip_layers=skip_layers,
                    background=background_of.get(args.models[0]))
            per_image = []
            with torch.no_grad():
                for x in xs:
                    before = meter.bytes + args.rpc_overhead * meter.messages
                    model(x[None])
                    per_image.append(meter.bytes + args.rpc_overhead * meter.messages - before)
            if name == "fp32" and t == 0:
                largest = meter.largest
            ratio = [b / j for b, j in zip(per_image, jpeg, strict=True)]
            bytes256[f"{name}@{t:g}"] = {"codec": name, "threshold": t, "bytes_per_image": statistics.mean(per_image),
                                         "ratio_to_jpeg_mean": statistics.mean(ratio),
                                         "ratio_to_jpeg_max": max(ratio)}
    cpu = codec_cpu_ms(largest, args.cpu_rounds, names)
    tokens_largest = {str(k): list(v.shape) for k, v in largest.items()}

    # ---- summary: each codec x threshold, mean over seeds, paired difference to fp32@0
    summary = []
    for key in acc[args.models[0]]:
        top = [acc[m][key]["top1"] for m in args.models]
        diff = [acc[m][key]["top1"] - acc[m]["fp32@0"]["top1"] for m in args.models]
        summary.append({"config": key, "top1_mean": statistics.mean(top), "top1_by_seed": top,
                        "diff_points_mean": 100 * statistics.mean(diff),
                        "diff_points_min": 100 * min(diff), "diff_points_max": 100 * max(diff),
                        "bytes_per_image_model_size": statistics.mean(acc[m][key]["bytes_per_image"]
                                                                      for m in args.models),
                        "ratio_to_jpeg_model_size": statistics.mean(acc[m][key]["bytes_per_image"]
                                                                    for m in args.models) / jpeg_model_size,
                        "bytes_per_image_256": bytes256[key]["bytes_per_image"],
                        "ratio_to_jpeg_256": bytes256[key]["ratio_to_jpeg_mean"]})
    ok = [s for s in summary if s["diff_points_mean"] >= -1.0]
    best = min(ok, key=lambda s: s["bytes_per_image_256"])
    best_codec = best["config"].split("@")[0]
    payload = {
        "command": " ".join(sys.argv), "models": args.models, "data": args.data, "image_size": args.image_size,
        "thresholds": args.thresholds, "skip_layers": args.skip_layers, "skip_background": args.skip_background,
        "bytes_data": args.bytes_data,
        "jpeg_bytes_mean_256": statistics.mean(jpeg), "jpeg_bytes_mean_model_size": jpeg_model_size,
        "accuracy": acc, "bytes_256": bytes256, "summary": summary, "best": best,
        "cpu_ms_per_layer_per_site": cpu, "cpu_tokens_shape": tokens_largest, "links": [],
        "wall_s": time.perf_counter() - t_start, "machine": machine_info(),
    }
    out = write_result(args.out, payload)  # written now too, so a failure in the link table loses nothing
    plot(summary, Path(out).with_suffix(".png"))
    links = []
    if not args.no_links:
        # measured bytes per number of the best codec (threshold 0, all layers together) and its CPU per number
        wire_bpv = 4.0 * bytes256[f"{best_codec}@0"]["bytes_per_image"] / bytes256["fp32@0"]["bytes_per_image"]
        n_values = sum(v.numel() for v in largest.values())
        codec_s = sum(cpu[best_codec].values()) / 1e3 / max(1, n_values)
        # the best setting with its skipping: effective bytes per routed number at the models' own size (where the
        # routers' confidence is their own), the codec's CPU per number actually sent
        eff_bpv = 4.0 * best["bytes_per_image_model_size"] / statistics.mean(
            acc[m]["fp32@0"]["bytes_per_image"] for m in args.models)
        variants = [("fp16", {"wire": "fp16"}),
                    (f"{best_codec}@0", {"wire": best_codec, "wire_bytes_per_value": wire_bpv,
                                         "codec_s_per_value": codec_s})]
        if best["config"] != f"{best_codec}@0":  # the best setting skips too
            variants.append((best["config"], {"wire": best_codec, "wire_bytes_per_value": eff_bpv,
                                              "codec_s_per_value": codec_s}))
        links = link_table(variants)
    payload.update(links=links, wall_s=time.perf_counter() - t_start)
    out = write_result(args.out, payload)
    print(f"wrote {out}")
    return 0


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        codec, t = s["config"].split("@")
        ax.scatter(s["ratio_to_jpeg_256"], s["top1_mean"] * 100, marker="o" if t == "0" else "^",
                   label=s["config"])
        ax.annotate(s["config"], (s["ratio_to_jpeg_256"], s["top1_mean"] * 100), fontsize=6)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per 256-px image / its JPEG (q90)")
    ax.set_ylabel("top-1 (%), mean of seeds, at the models' size")
    ax.set_title("token codec x skip threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
