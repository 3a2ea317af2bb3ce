"""``moe-convert``: turn a dense checkpoint into a per-patch MoE with the paper's initialisation.

    moe-convert --dense runs/dense/best.safetensors --data digits --layers 8 --experts 16 --hidden 64 \\
                --out runs/moe.safetensors --report runs/moe-report.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moevit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from moevit.cli.common import StageBar, run_cli, set_threads
from moevit.config import NUM_TRANSFORMER_LAYERS, ROUTERS, MoEConfig
from moevit.convert import ROUTER_INITS, ConvertConfig, conversion_fingerprint, convert
from moevit.data import open_dataset
from moevit.flops import count_macs, count_params
from moevit.moe.routing import record_routing


def parse_layers(values: list[str]) -> tuple[int, ...]:
    """``--layers 2,4,6,8`` or ``--layers 2 4 6 8``."""
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"--layers: {part!r} is not a layer index (0-{NUM_TRANSFORMER_LAYERS - 1})") from None
    bad = [i for i in out if not 0 <= i < NUM_TRANSFORMER_LAYERS]
    if bad:
        raise ValueError(f"--layers: {bad} out of range; MobileViTV2 has transformer layers 0-8")
    return tuple(out)


@torch.no_grad()
def compare(dense, moe, dataset, batch: int = 64) -> dict[str, Any]:
    """Top-1 agreement of ``moe`` with ``dense``, both accuracies, and the MoE layers' expert load."""
    agree = correct_d = correct_m = n = 0
    loads = {i: torch.zeros(layer.num_experts) for i, layer in moe.moe_layers().items()}
    for j in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(j, min(j + batch, len(dataset)))]
        x = torch.stack([a for a, _ in items])
        y = torch.tensor([b for _, b in items])
        pd = dense(x).argmax(1)
        with record_routing(moe) as rec:
            pm = moe(x).argmax(1)
        for i in loads:
            loads[i] += rec.tokens_per_expert(i).float()
        agree += int((pd == pm).sum())
        correct_d += int((pd == y).sum())
        correct_m += int((pm == y).sum())
        n += len(y)
    return {"agreement_top1": agree / max(n, 1), "top1_dense": correct_d / max(n, 1),
            "top1_moe_before_finetune": correct_m / max(n, 1), "eval_images": n,
            "expert_load": {str(i): (v / v.sum().clamp_min(1)).tolist() for i, v in loads.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="dense moevit checkpoint (.safetensors) trained on the data")
    ap.add_argument("--data", required=True, help="dataset spec (the one the dense model was trained on)")
    ap.add_argument("--layers", nargs="+", default=["8"], help="transformer layers 0-8: '8', '2,4,6,8' or '2 4 6 8'")
    ap.add_argument("--experts", type=int, default=16, help="experts per MoE layer (E)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden units per expert (K)")
    ap.add_argument("--top-k", type=int, default=1, choices=(1, 2))
    ap.add_argument("--correction", default="residual", choices=("residual", "paper"),
                    help="residual: v=MLP(mu)-sub(mu), alpha=1 (exact at the centroid); paper: v=MLP(mu), alpha=0")
    ap.add_argument("--gate", default="renorm", choices=("renorm", "softmax"),
                    help="renorm: top-k renormalised (top-1 gate = 1); softmax: plain softmax probability")
    ap.add_argument("--logit-scale", type=float, default=20.0, help="initial router logit scale s")
    ap.add_argument("--patches-per-class", type=int, default=64, help="K_c of Algorithm 1")
    ap.add_argument("--rounds", type=int, default=3, help="R refinement rounds of Algorithm 1")
    ap.add_argument("--images-per-class", type=int, default=64)
    ap.add_argument("--units", default="overlap-topk", choices=("overlap-topk", "disjoint-balanced"),
                    help="expert hidden units: the K most important per cluster, experts may overlap (default), or "
                         "MoEfication's disjoint equal groups by balanced k-means, K most important of each")
    ap.add_argument("--router-init", default="ward", choices=ROUTER_INITS,
                    help="how representative patches become experts and centroids: ward (the paper's, default), "
                         "kmeans, class-means (E = C: one class each; E < C: classes grouped by Ward on their means; "
                         "E > C: classes split by k-means), random (random patches as centroids, seeded)")
    ap.add_argument("--router", default="cosine", choices=ROUTERS,
                    help="cosine: cosine to the centroids x a learned scale (default); linear: a linear layer from a "
                         "seeded random start, learned in fine-tuning (experts still from the clusters)")
    ap.add_argument("--sizes", default=None, metavar="MIN:MAX",
                    help="random image sizes for clustering, 32 px steps (default: 0.625-1.25 x training size); "
                         "MIN = MAX samples at one size")
    ap.add_argument("--seed", type=int, default=0, help="seed of image sampling and of the held-out split")
    ap.add_argument("--out", required=True, help="output MoE checkpoint (.safetensors)")
    ap.add_argument("--report", default=None, help="report JSON (default: next to --out)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    def body() -> int:
        set_threads(args.threads)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        dense = load_checkpoint(args.dense)
        if dense.config.moe is not None:
            raise CheckpointError(f"{args.dense}: already an MoE model (layers {list(dense.config.moe.layers)}); "
                                  "--dense needs a dense checkpoint")
        moe_cfg = MoEConfig(layers=parse_layers(args.layers), num_experts=args.experts, expert_hidden=args.hidden,
                            top_k=args.top_k, correction=args.correction, gate=args.gate,
                            logit_scale=args.logit_scale, router=args.router)
        for i in moe_cfg.layers:  # fail before any work when K does not fit a layer
            width = dense.transformer_layers()[i].mlp.fc1.out_channels
            if args.hidden > width:
                raise ValueError(f"--hidden {args.hidden} exceeds the dense MLP width {width} of layer {i}")
        size_min = size_max = None
        if args.sizes:
            try:
                size_min, size_max = (int(v) for v in args.sizes.split(":"))
            except ValueError:
                raise ValueError(f"--sizes {args.sizes!r}: expected MIN:MAX, e.g. 160:320") from None
        cfg = ConvertConfig(moe=moe_cfg, patches_per_class=args.patches_per_class, rounds=args.rounds,
                            images_per_class=args.images_per_class, units=args.units, size_min=size_min,
                            size_max=size_max, seed=args.seed, router_init=args.router_init)
        native = dense.config.image_size
        open_at = functools.lru_cache(maxsize=None)(
            lambda s: open_dataset(args.data, image_size=s, split="train", seed=args.seed))
        train = open_at(native)
        if len(train.classes) != dense.config.num_classes:
            raise ValueError(f"{args.dense} has {dense.config.num_classes} classes but {args.data} has "
                             f"{len(train.classes)}")
        held_out = open_dataset(args.data, image_size=native, split="eval", seed=args.seed)
        timings["load"] = time.perf_counter() - t0

        stages = StageBar(2 * len(moe_cfg.layers) + 2, "convert")
        moe, layer_report = convert(dense, open_at, list(train.targets), cfg, on_stage=stages)
        timings["convert"] = layer_report.pop("seconds_total")
        stages("evaluate on the held-out split")
        t1 = time.perf_counter()
        cmp = compare(dense, moe, held_out)
        timings["evaluate"] = time.perf_counter() - t1
        stages("save")
        options = {k: v for k, v in cfg.__dict__.items() if k != "moe"}
        out = save_checkpoint(moe, args.out, extra={"conversion": json.dumps(
            {"router_init": cfg.router_init, "router": moe_cfg.router, "units": cfg.units,
             "sizes": layer_report["sizes"], "patches_per_class": cfg.patches_per_class, "rounds": cfg.rounds,
             "seed": cfg.seed})})
        stages.close()
        report = {
            "dense": args.dense, "data": args.data, "out": str(out),
            "moe": moe_cfg.to_dict(),
            "options": options, "router_init": cfg.router_init, "router": moe_cfg.router,
            **cmp,
            # moe-analyze --report refuses the report for a model of another conversion
            "conversion_fingerprint": conversion_fingerprint(moe),
            "params": {"dense": count_params(dense), "moe": count_params(moe)},
            "macs": {"dense": count_macs(dense, native), "moe": count_macs(moe, native), "image_size": native},
            **layer_report,
            "seconds": {**timings, "total": time.perf_counter() - t0},
        }
        for i, load in cmp["expert_load"].items():
            report["layers"][i]["expert_load_held_out"] = load
        rpath = Path(args.report) if args.report else out.with_suffix(".report.json")
        rpath.parent.mkdir(parents=True, exist_ok=True)
        rpath.write_text(json.dumps(report, indent=2))
        print(f"converted {args.dense} -> {out}: MoE-{args.experts} (K={args.hidden}) at layers "
              f"{list(moe_cfg.layers)}, {args.correction} correction, {args.gate} gate, {args.router_init} init, "
              f"{args.router} router, {args.units} units")
        print(f"agreement with dense (top-1): {cmp['agreement_top1']:.4f}   top-1 dense {cmp['top1_dense']:.4f}   "
              f"MoE before fine-tuning {cmp['top1_moe_before_finetune']:.4f}   ({cmp['eval_images']} held-out)")
        print(f"parameters {report['params']['dense']:,} -> {report['params']['moe']:,}   MACs/image "
              f"{report['macs']['dense']:,} -> {report['macs']['moe']:,} at {native}px")
        for i, rep in report["layers"].items():
            print(f"layer {i}: cluster sizes {rep['cluster_sizes']}  "
                  f"(collect {rep['seconds']['collect']:.1f}s, cluster {rep['seconds']['cluster']:.2f}s, "
                  f"moefy {rep['seconds']['moefy']:.2f}s)")
        print(f"report: {rpath}")
        return 0

    return run_cli("moe-convert", body)


if __name__ == "__main__":
    sys.exit(main())
