"""``moe-coordinator --topology sites.yaml``: classify images with the MoE model split over the sites.

    moe-coordinator --topology examples/sites.yaml --data digits --limit 200
    moe-coordinator --topology sites.yaml --images /data/cam01 --out results.jsonl
    moe-coordinator --topology sites.yaml --serve 0.0.0.0:50100

Loopback sites where no worker answers get a local worker process, stopped on exit (``--no-spawn`` turns this
off). Prints a progress bar, then a summary: images/s, latency, bytes per site per image, tokens per expert/site.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from coordinator.launcher import LaunchError, ensure_workers
from coordinator.runtime import CoordinatorError, SplitRuntime
from coordinator.sites import SiteError
from moevit.checkpoint import CheckpointError
from moevit.data import IMAGE_EXTENSIONS, UnreadableImageError, load_image, open_dataset
from partition.topology import TopologyError, load_topology


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-coordinator", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", required=True, help="sites.yaml (see docs/topology.md)")
    ap.add_argument("--model", help="MoE checkpoint (default: the topology's model:)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="classify every image file under DIR")
    src.add_argument("--data", metavar="SPEC", help="classify a dataset split (labels known: accuracy reported)")
    ap.add_argument("--split", default="eval", help="split of --data (default eval: the seeded 20%% holdout)")
    ap.add_argument("--limit", type=int, default=None, help="at most N images")
    ap.add_argument("--out", help="write one JSON line per image here")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=None, help="default: the size the model was trained at")
    ap.add_argument("--wire", choices=("fp16", "fp32", "bf16"), default="fp16", help="token dtype on the wire")
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds allowed for each expert RPC")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the coordinator (default: all cores, or 1 when it started local workers: "
                         "spinning OpenMP threads would starve workers on the same cores)")
    ap.add_argument("--worker-threads", type=int, default=1, help="threads of each local worker it starts")
    ap.add_argument("--no-spawn", action="store_true", help="never start local workers")
    ap.add_argument("--serve", metavar="ADDR", help="serve the Classify RPC on ADDR instead of a batch run")
    ap.add_argument("--max-batch", type=int, default=8, help="with --serve: largest batch formed from requests")
    return ap


def _image_files(root: str) -> list[Path]:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"--images {root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _inputs(args: argparse.Namespace, size: int) -> tuple[int, Iterator[tuple[str, torch.Tensor | None, int | None,
                                                                            str | None]]]:
    """(count, iterator of (name, image or None, true label or None, error or None))."""
    if args.images:
        files = _image_files(args.images)[: args.limit]

        def gen_files():
            for f in files:
                try:
                    yield str(f.relative_to(args.images)), load_image(f, size), None, None
                except UnreadableImageError as e:
                    yield str(f.relative_to(args.images)), None, None, f"unreadable image: {e}"

        return len(files), gen_files()
    data = open_dataset(args.data, image_size=size, split=args.split)
    n = min(len(data), args.limit or len(data))

    def gen_data():
        for i in range(n):
            x, y = data[i]
            yield f"{args.data}:{args.split}:{i}", x, int(y), None

    return n, gen_data()


def _batches(it, size: int):
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(runtime: SplitRuntime, args: argparse.Namespace, size: int) -> dict[str, Any]:
    total, inputs = _inputs(args, size)
    labels = list(runtime.model.config.labels)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 (closed below)
    latencies, n_ok, n_degraded, n_failed, n_correct, n_labelled = [], 0, 0, 0, 0, 0
    failures: dict[str, int] = {}
    shown = 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="classify", dynamic_ncols=True)
    try:
        for batch in _batches(inputs, args.batch_size):
            good = [b for b in batch if b[1] is not None]
            records = {b[0]: {"file": b[0], "error": b[3]} for b in batch if b[1] is None}
            if good:
                x = torch.stack([b[1] for b in good])
                try:
                    res = runtime.classify(x)
                    latencies += [res.seconds * 1e3] * len(good)
                    probs = res.logits.softmax(dim=1)
                    for j, (name, _, y, _) in enumerate(good):
                        top = torch.topk(probs[j], min(5, probs.shape[1]))
                        pred = int(top.indices[0])
                        rec = {"file": name, "prediction": pred,
                               "label": labels[pred] if pred < len(labels) else str(pred),
                               "confidence": float(top.values[0]),
                               "top5": [[int(i), float(p)] for p, i in zip(top.values, top.indices, strict=True)],
                               "degraded": bool(res.degraded[j])}
                        if y is not None:
                            rec["true"] = y
                            n_labelled += 1
                            n_correct += int(pred == y)
                        records[name] = rec
                    for f in res.failures:
                        failures[f] = failures.get(f, 0) + 1
                except SiteError as e:
                    for name, *_ in good:
                        records[name] = {"file": name, "error": str(e)}
                    failures[str(e)] = failures.get(str(e), 0) + len(good)
            for name, *_ in batch:
                rec = records[name]
                if "error" in rec and rec["error"]:
                    n_failed += 1
                else:
                    rec.pop("error", None)
                    n_ok += 1
                    n_degraded += int(rec["degraded"])
                    if shown < 10:
                        truth = f" (true {labels[rec['true']]})" if "true" in rec and rec["true"] < len(labels) else ""
                        bar.write(f"  {name}: {rec['label']} {rec['confidence']:.2f}{truth}"
                                  + ("  [degraded]" if rec["degraded"] else ""))
                        shown += 1
                if out:
                    out.write(json.dumps(rec) + "\n")
            bar.update(len(batch))
    finally:
        bar.close()
        if out:
            out.close()
    elapsed = time.perf_counter() - t_start
    n = n_ok + n_failed
    lat = sorted(latencies)
    traffic = runtime.traffic()
    summary = {
        "images": n, "ok": n_ok, "degraded": n_degraded, "failed": n_failed,
        "images_per_s": n_ok / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": statistics.median(lat) if lat else None,
                       "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None},
        "accuracy": n_correct / n_labelled if n_labelled else None,
        "per_site": {site: {**t, "bytes_sent_per_image": t["bytes_sent"] / max(n_ok, 1),
                            "bytes_received_per_image": t["bytes_received"] / max(n_ok, 1)}
                     for site, t in traffic.items()},
        "tokens_per_site": runtime.tokens_by_site(),
        "tokens_per_expert": {f"{layer}:{e}": v for (layer, e), v in sorted(runtime.context.tokens.items())},
        "failures": failures,
    }
    _print_summary(summary, runtime)
    return summary


def _print_summary(s: dict[str, Any], runtime: SplitRuntime) -> None:
    p = print
    p(f"\n{s['images']} images: {s['ok']} classified ({s['degraded']} degraded), {s['failed']} failed")
    if s["latency_ms"]["p50"] is not None:
        p(f"throughput {s['images_per_s']:.1f} images/s   latency p50 {s['latency_ms']['p50']:.1f} ms   "
          f"p99 {s['latency_ms']['p99']:.1f} ms (per batch)")
    if s["accuracy"] is not None:
        p(f"accuracy {s['accuracy']:.4f}")
    p(f"{'site':<14}{'address':<22}{'calls':>7}{'sent B/img':>12}{'recv B/img':>12}{'tokens':>9}")
    for site, t in s["per_site"].items():
        p(f"{site:<14}{runtime.topology.site(site).address:<22}{t['calls']:>7}{t['bytes_sent_per_image']:>12.0f}"
          f"{t['bytes_received_per_image']:>12.0f}{t['tokens']:>9}")
    local = s["tokens_per_site"].get(runtime.local_site, 0)
    p(f"{runtime.local_site:<14}{'(in-process)':<22}{'':>7}{'':>12}{'':>12}{local:>9}")
    per_layer: dict[str, list[str]] = {}
    for key, v in s["tokens_per_expert"].items():
        layer, e = key.split(":")
        per_layer.setdefault(layer, []).append(f"{e}:{v}")
    for layer, items in per_layer.items():
        p(f"layer {layer} tokens per expert: " + " ".join(items))
    for f, count in s["failures"].items():
        p(f"failure ({count} images): {f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="moe-coordinator: %(message)s")
    workers = None
    runtime = None
    try:
        topology = load_topology(args.topology)
        if not (args.images or args.data or args.serve):
            raise CoordinatorError("nothing to do: give --images DIR, --data SPEC or --serve ADDR")
        runtime = SplitRuntime.from_topology(topology, model_path=args.model, wire=args.wire,
                                             deadline_s=args.deadline)
        if not args.no_spawn:
            workers = ensure_workers(args.topology, runtime.clients, model=args.model, threads=args.worker_threads,
                                     log=lambda s: print(f"moe-coordinator: {s}", file=sys.stderr))
        if args.threads or (workers and workers.procs):
            torch.set_num_threads(args.threads or 1)
        runtime.check_workers()
        size = args.image_size or runtime.model.config.image_size
        print(f"model {runtime.fingerprint} ({runtime.model.config.arch}, MoE layers "
              f"{list(runtime.model.config.moe.layers)}), sites {', '.join([topology.coordinator, *runtime.clients])}"
              f", {args.wire} on the wire, fallback {topology.fallback}", file=sys.stderr)
        if args.serve:
            from coordinator.server import serve

            asyncio.run(serve(runtime, args.serve, image_size=size, max_batch=args.max_batch))
            return 0
        summary = run_batch(runtime, args, size)
        return 0 if summary["ok"] or not summary["images"] else 1
    except (TopologyError, CoordinatorError, CheckpointError, LaunchError, SiteError, FileNotFoundError,
            ValueError) as e:
        print(f"moe-coordinator: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-coordinator: interrupted", file=sys.stderr)
        return 130
    finally:
        if runtime is not None:
            runtime.close()
        if workers is not None:
            workers.stop()


if __name__ == "__main__":
    sys.exit(main())
