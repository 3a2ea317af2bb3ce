"""Console scripts of the partitioner: ``moe-profile`` (routing statistics) and ``moe-partition`` (placement).

Every input is checked before any work starts; a problem the user can fix is one line on stderr,
``<prog>: error: <what is wrong>``, and exit status 2. ``moe-partition`` never imports torch unless the
topology's model file lacks a stored fingerprint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moevit.partition.costmodel import (
    OBJECTIVES,
    REPLICA_POLICIES,
    SCENARIOS,
    load_stats,
    parse_weights,
    save_stats,
    wire_bytes_for,
)

from moevit.checkpoint_meta import checkpoint_fingerprint
from moevit.cli.runner import run_cli
from moevit.offwire import parse_layer_list

__all__ = ["partition_main", "profile_main"]


def _skip_layers(text: str) -> tuple[int, ...]:
    """``--skip-layers``: :func:`moevit.offwire.parse_layer_list`, its ValueError as argparse's usage error."""
    try:
        return parse_layer_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ============================================================================================ moe-profile


def profile_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-profile",
        description="Routing statistics of an MoE checkpoint on a dataset, for moe-partition and moe-sim "
                    "(format: docs/stats.md).")
    ap.add_argument("--model", required=True, help="a moevit MoE .safetensors checkpoint")
    ap.add_argument("--data", required=True,
                    help="dataset spec: digits | synthetic[:k=v,...] | folder:PATH | ssw60:PATH")
    ap.add_argument("--out", required=True, help="where to write stats.json")
    ap.add_argument("--images", type=int, default=512,
                    help="profile a seeded subset of this many images of the split (default 512; 0 = all)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the size the model was trained at")
    ap.add_argument("--split", default="eval", help="dataset split (default eval: the seeded 20%% holdout)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the holdout split and of the image subset")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-dense", action="store_true", help="skip counting the dense equivalent's MACs")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.images < 0:
            raise ValueError(f"--images must be >= 0, got {args.images}")
        if args.image_size is not None and args.image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        import torch
        from moevit.partition.profile import profile_model

        from moevit.checkpoint import load_checkpoint
        from moevit.data import open_dataset

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_checkpoint(args.model)
        if not model.moe_layers():
            raise ValueError(f"{args.model}: a dense model (no MoE layers); profile a converted MoE checkpoint")
        size = args.image_size or model.config.image_size
        data = open_dataset(args.data, image_size=size, split=args.split, seed=args.seed)
        data.check_classes(model.config.num_classes, args.model)  # as moe-eval and moe-coordinator
        stats = profile_model(model, data, images=args.images or None, batch_size=args.batch_size,
                              seed=args.seed, progress=sys.stderr.isatty(), count_dense=not args.no_dense)
        stats["model_file"] = str(args.model)
        save_stats(stats, args.out)
        print(f"profiled {stats['images']} images of {data.describe()}")
        print(f"{'layer':>5} {'dim':>4} {'grid':>7} {'experts':>7} {'K':>4} {'busiest share':>13} "
              f"{'idle experts':>12}")
        for ls in stats["layers"]:
            mean = ls["patches_per_expert"]["mean"]
            share = max(mean) / max(sum(mean), 1e-12)
            idle = sum(1 for v in mean if v == 0)
            grid = f"{ls['grid'][0]}x{ls['grid'][1]}"
            print(f"{ls['layer']:>5} {ls['dim']:>4} {grid:>7} {ls['num_experts']:>7} {ls['expert_hidden']:>4} "
                  f"{share:>13.2f} {idle:>12}")
        print(f"MACs/image: {stats['total_macs']:,} (trunk {stats['trunk_macs']:,}, experts {stats['expert_macs']:,})")
        print(f"fingerprint {stats['fingerprint']}; wrote {args.out}")
        return 0

    return run_cli("moe-profile", body)


# ============================================================================================ moe-partition


def partition_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-partition",
        description="Place the experts of an MoE model on the sites of a topology, within memory caps, minimising "
                    "latency, energy, bytes or a weighted sum (cost model: docs/stats.md).")
    ap.add_argument("--topology", required=True, help="sites.yaml")
    ap.add_argument("--stats", required=True, help="stats.json from moe-profile")
    ap.add_argument("--objective", required=True, metavar="|".join(OBJECTIVES),
                    help="what to minimise per image")
    ap.add_argument("--weights", default=None,
                    help="for --objective weighted: e.g. latency=1,energy=1,bytes=1 (per s, per J, per MB)")
    ap.add_argument("--out", required=True, help="where to write placement.yaml")
    ap.add_argument("--time-limit", type=float, default=10.0, help="MILP time limit in seconds (default 10)")
    ap.add_argument("--replicas", type=int, default=0,
                    help="per layer, up to N background experts also get a copy on the coordinator when it helps")
    ap.add_argument("--replica-policy", default="local-first", metavar="|".join(REPLICA_POLICIES),
                    help="how the coordinator uses copies: its own copy, else the first by site name (default, what "
                         "moe-coordinator does), or split the load evenly")
    ap.add_argument("--method", default="auto", metavar="auto|milp|heuristic",
                    help="auto (default): both, keep the better")
    ap.add_argument("--scenarios", default="class", metavar="|".join(SCENARIOS),
                    help="latency over per-class routing scenarios (default) or from mean loads")
    ap.add_argument("--wire", default="fp16", metavar="CODEC",
                    help="token codec on the wire (default fp16; int8, int4, ...+zstd: moevit_rpc.codecs); its nominal "
                    "bytes per number unless --wire-bytes gives the measured figure")
    ap.add_argument("--wire-bytes", type=float, default=None, metavar="B",
                    help="measured bytes per token number of --wire, scales and zstd included (bench/bench_wire.py)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the heuristic and the random baseline")
    skip = ap.add_argument_group("background skipping (as moe-coordinator's --skip-* rule will run)")
    skip.add_argument("--skip-share", type=float, default=None, metavar="S",
                      help="the share of each background expert's patches the coordinator's rule keeps off the wire "
                      "(those under its --skip-threshold; the simulator's low_confidence_share): the placement is "
                      "optimised, and costed, with them off the wire")
    skip.add_argument("--skip-layers", type=_skip_layers, default=None, metavar="L[,L...]",
                      help="the MoE layers the rule applies at, e.g. 5,8 (default: every MoE layer)")
    skip.add_argument("--skip-action", choices=("residual", "local"), default="residual",
                      help="what computes the skipped patches: nothing (default) or the coordinator's own copies")
    args = ap.parse_args(argv)

    def body() -> int:
        from moevit.deploy.topology import load_topology, save_placement
        from moevit.partition.placement import METHODS, format_report, place, skip_fractions

        # Every argument is checked before anything is read or solved.
        if args.objective not in OBJECTIVES:
            raise ValueError(f"--objective {args.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if args.weights is not None and args.objective != "weighted":
            raise ValueError(f"--weights applies only to --objective weighted, not {args.objective!r}")
        weights = parse_weights(args.weights) if args.objective == "weighted" else None
        if args.method not in METHODS:
            raise ValueError(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
        if args.replica_policy not in REPLICA_POLICIES:
            raise ValueError(f"--replica-policy {args.replica_policy!r} is not one of {', '.join(REPLICA_POLICIES)}")
        if args.scenarios not in SCENARIOS:
            raise ValueError(f"--scenarios {args.scenarios!r} is not one of {', '.join(SCENARIOS)}")
        from moevit_rpc.codecs import parse_codec

        try:
            parse_codec(args.wire)
        except ValueError as e:
            raise ValueError(f"--wire: {e}") from None
        if args.wire_bytes is not None and not args.wire_bytes > 0:
            raise ValueError(f"--wire-bytes must be > 0, got {args.wire_bytes}")
        if not args.time_limit > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
        if args.replicas < 0:
            raise ValueError(f"--replicas must be >= 0, got {args.replicas}")
        if args.skip_share is not None and not 0.0 <= args.skip_share <= 1.0:
            raise ValueError(f"--skip-share must be in [0, 1], got {args.skip_share}")
        if args.skip_share is None and args.skip_layers is not None:
            raise ValueError("--skip-layers applies only with --skip-share")
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {args.out}: is a directory; name the placement file")
        topology = load_topology(args.topology)
        stats = load_stats(args.stats)
        if topology.model is not None and topology.model.is_file():
            model_fp = checkpoint_fingerprint(topology.model)
            if model_fp != stats.fingerprint:
                raise ValueError(
                    f"{args.stats}: profiled from model {stats.fingerprint}, but the topology's model "
                    f"{topology.model} is {model_fp}; run moe-profile on that model")
        wire = args.wire_bytes if args.wire_bytes is not None else wire_bytes_for(args.wire, stats)
        offwire = None
        if args.skip_share is not None:
            try:
                offwire = skip_fractions(stats, share=args.skip_share, layers=args.skip_layers)
            except ValueError as e:
                raise ValueError(f"--skip-layers: {e}") from None
        result = place(topology, stats, objective=args.objective, weights=weights, wire_bytes=wire,
                       method=args.method, time_limit=args.time_limit, replicas=args.replicas,
                       replica_policy=args.replica_policy, scenarios=args.scenarios, seed=args.seed,
                       offwire=offwire, offwire_action=args.skip_action)
        if offwire is not None:
            kept = {ls.layer: round(float((f * ls.load_mean).sum()), 2) for ls, f in zip(stats.layers, offwire,
                                                                                          strict=True) if f.any()}
            print(f"background skipping ({args.skip_action}): patches per image kept off the wire, by layer: "
                  + (", ".join(f"{k}: {v}" for k, v in kept.items()) or "none (no background experts)"))
        print(format_report(result))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_placement(result.placement, out, fingerprint=stats.fingerprint)
        print(f"wrote {out} ({result.seconds:.2f} s)")
        return 0

    return run_cli("moe-partition", body)


if __name__ == "__main__":
    sys.exit(partition_main())
