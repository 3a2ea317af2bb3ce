"""``moe-coordinator --topology sites.yaml``: classify images with the MoE model split over the sites.

    moe-coordinator --topology examples/sites.yaml --data digits --limit 200
    moe-coordinator --topology sites.yaml --images /data/cam01 --out results.json     # MegaDetector format 1.6
    moe-coordinator --topology sites.yaml --images /data/cam01 --out results.jsonl    # one JSON line per image
    moe-coordinator --topology sites.yaml --serve 0.0.0.0:50100    # mutual TLS/token: the coordinator site's

Loopback sites where no worker answers get a local worker process, stopped on exit (``--no-spawn`` turns this
off). Prints a progress bar, then a summary: images/s, latency, bytes per site per image, tokens per expert/site.

Results are written as they are made (``results.json.partial.jsonl``, one fsync per batch); the same command run
again after a crash or kill skips the images already done by the same model (a ``.jsonl`` output is rewritten).
Each image's EXIF capture time and camera are recorded and images are grouped into sequences
(``--sequence-gap``). ``--metrics-port`` serves Prometheus metrics. A checkpoint calibrated by ``moe-calibrate``
gets its temperature applied and, with a ``blank`` class, its blank threshold (blank images: ``detections: []``).
``--mqtt URL`` publishes one summary per sequence through a durable outbox (``coordinator/uplink.py``). Degraded
images (a fallback computed part of them) are classified again once their sites are back, between batches, at the
end (``--rescore-wait``) or by the next run with the same ``--out``, and written and published as corrections
(``coordinator/corrections.py``). Output fields, the resume rule and metric names: docs/outputs.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from moevit.coordinator import results as res
from moevit.coordinator.corrections import DEFAULT_LIMIT as DEFAULT_RESCORE_LIMIT
from moevit.coordinator.corrections import DEFAULT_MAX_AGE_S as DEFAULT_RESCORE_MAX_AGE_S
from moevit.coordinator.corrections import RescoreQueue, utc_now
from moevit.coordinator.fieldmeta import DEFAULT_SEQUENCE_GAP_S, read_image_meta
from moevit.coordinator.launcher import LaunchError, ensure_classify_server, ensure_workers
from moevit.coordinator.runtime import CoordinatorError, SplitRuntime
from moevit.coordinator.sites import SiteError
from moevit.coordinator.strategies import open_runtime, strategy_lines
from moevit.deploy.topology import Topology, load_topology
from tqdm import tqdm

from moevit.cli.common import add_onnx_camera_args, onnx_camera_config
from moevit.cli.runner import USAGE_ERRORS, exit_now, run_cli
from moevit.data import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_CEILING,
    Taxon,
    UnreadableImageError,
    load_image,
    open_dataset,
)
from moevit.moe.skip import rules_from_options
from moevit.offwire import parse_layer_list
from moevit_rpc.codecs import CODEC_NAMES

if TYPE_CHECKING:
    import grpc


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
    ap.add_argument("--out", metavar="FILE", help="results: FILE.json is MegaDetector batch output (format 1.6; a "
                    "run with the same --out resumes, docs/outputs.md), FILE.jsonl one JSON line per image")
    ap.add_argument("--restart", action="store_true", help="discard the results of earlier runs with this --out "
                    "instead of resuming")
    ap.add_argument("--sequence-gap", type=float, default=DEFAULT_SEQUENCE_GAP_S, metavar="S",
                    help="a new sequence starts after more than S seconds without an image (default 60)")
    ap.add_argument("--taxa", metavar="CSV", help="taxa.csv (label,common_name,scientific_name) naming the classes' "
                    "scientific names (default with --data ssw60:PATH: its taxa.csv)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-megapixels", type=float, default=MAX_IMAGE_PIXELS / 1e6, metavar="MP",
                    help=f"images declaring more pixels are refused from their header, before decoding, in batch "
                    f"runs and by --serve (default {MAX_IMAGE_PIXELS / 1e6:g}: admits 48 MP trail-camera images; at "
                    f"most {MAX_IMAGE_PIXELS_CEILING / 1e6:g})")
    ap.add_argument("--image-size", type=int, default=None, help="default: the size the model was trained at")
    ap.add_argument("--wire", choices=CODEC_NAMES, default=None, metavar="CODEC",
                    help="token codec on every link, replacing the topology's rpc.codec (default: the topology's, "
                    f"fp16 unless set; one of {', '.join(CODEC_NAMES)})")
    add_onnx_camera_args(ap.add_argument_group("camera side on onnxruntime (docs/onnx.md)"),
                         runs="the camera side (trunk and routers; experts run where the placement puts them either "
                         "way: a worker's own backend is moe-worker --backend)")
    skip = ap.add_argument_group("background skipping: remote patches kept off the wire (moevit.moe.skip)")
    skip.add_argument("--skip-threshold", type=float, default=0.0, metavar="P",
                      help="patches whose top-1 router probability is under P stay off the wire (default 0: none)")
    skip.add_argument("--skip-background", metavar="ANALYSIS_JSON",
                      help="moe-analyze's analysis.json: patches of each layer's background experts stay off the "
                      "wire too (with --skip-match all: only low-confidence ones)")
    skip.add_argument("--skip-match", choices=("any", "all"), default="any")
    skip.add_argument("--skip-action", choices=("residual", "local"), default="residual",
                      help="what computes them: nothing, the residual path carries them (default), or the camera's "
                      "own copy of the expert (it then loads every expert)")
    skip.add_argument("--skip-layers", type=_skip_layers, default=None, metavar="L[,L...]",
                      help="apply the rule only at these MoE layers, e.g. 5,8 (default: every MoE layer); the "
                      "others send every remote patch")
    skip.add_argument("--skip-capacity", type=int, default=None, metavar="N",
                      help="at most N remote patches per image and MoE layer, the most confident")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds allowed for each MoE layer's expert RPCs, retries included (default: the "
                    "topology's rpc.deadline_s, 10)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the coordinator (default: the cores left after one per worker site on "
                         "this machine, 1 when it started the workers: spinning OpenMP threads would starve workers "
                         "on the same cores)")
    ap.add_argument("--worker-threads", type=int, default=1, help="threads of each local worker it starts")
    ap.add_argument("--no-spawn", action="store_true", help="never start local workers")
    ap.add_argument("--strategy", choices=("split", "local", "offload-image", "adaptive"), default=None,
                    help="how images are classified, replacing the topology's strategy: (default split; "
                    "docs/topology.md)")
    ap.add_argument("--as-site", metavar="NAME", help="run as the topology's site NAME instead of its coordinator "
                    "(its device, TLS and token): how an offload site serves the whole model, e.g. --serve ADDR "
                    "--as-site pi-north --strategy local")
    ap.add_argument("--serve", metavar="ADDR", help="serve the Classify RPC on ADDR instead of a batch run; with "
                    "the coordinator site's tls (mutual TLS only) and token_file (bearer token) when it has them")
    ap.add_argument("--max-batch", type=int, default=8, help="with --serve: largest batch formed from requests")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                    help="with --serve: how long a batch waits after its first request for more (default 2; "
                    "more fills batches from many clients at the cost of a lone request's latency)")
    ap.add_argument("--metrics-port", metavar="[HOST:]PORT", help="serve Prometheus metrics at "
                    "http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)")
    up = ap.add_argument_group("uplink: event summaries over MQTT through a durable outbox (docs/outputs.md)")
    up.add_argument("--mqtt", metavar="URL", help="publish event summaries with QoS 1 to mqtt://[user@]host[:port]"
                    "[/topic-prefix] (mqtts:// for TLS); each message waits in the outbox until the broker "
                    "acknowledges it; an unreachable broker never stops classification")
    up.add_argument("--mqtt-images", action="store_true", help="publish every image's record too")
    up.add_argument("--mqtt-outbox", metavar="FILE", help="the outbox (SQLite; default <out>.outbox.sqlite, or "
                    "moevit-outbox.sqlite without --out)")
    up.add_argument("--mqtt-password-file", metavar="FILE", help="the broker password (first line)")
    up.add_argument("--mqtt-ca", metavar="PEM", help="CA of the broker's certificate (mqtts://)")
    up.add_argument("--mqtt-cert", metavar="PEM", help="client certificate for mutual TLS (with --mqtt-key)")
    up.add_argument("--mqtt-key", metavar="PEM", help="client key for mutual TLS")
    up.add_argument("--mqtt-wait", type=float, default=10.0, metavar="S", help="at the end, wait up to S seconds "
                    "for the broker to acknowledge what is queued (the rest stays in the outbox; default 10)")
    rs = ap.add_argument_group("re-scoring degraded results once their sites are back (docs/reliability.md)")
    rs.add_argument("--no-rescore", dest="rescore", action="store_false", help="keep degraded results as they are")
    rs.add_argument("--rescore-limit", type=int, default=DEFAULT_RESCORE_LIMIT, metavar="N", help="at most N "
                    f"degraded images wait for their sites (the oldest leave first; default {DEFAULT_RESCORE_LIMIT})")
    rs.add_argument("--rescore-max-age", type=float, default=DEFAULT_RESCORE_MAX_AGE_S, metavar="S",
                    help="a degraded image whose sites are not back S seconds after it was classified stays "
                    f"degraded (default {DEFAULT_RESCORE_MAX_AGE_S:g}: a day)")
    rs.add_argument("--rescore-wait", type=float, default=0.0, metavar="S", help="at the end, wait up to S seconds "
                    "for the sites of degraded images to come back (default 0: the next run with the same --out "
                    "re-scores them)")
    return ap


def _open_uplink(args: argparse.Namespace) -> Any:
    """The started MQTT uplink of ``--mqtt`` (None without it); bad options are a ValueError naming them."""
    if not args.mqtt:
        return None
    from moevit.coordinator.uplink import open_uplink

    password = None
    if args.mqtt_password_file:
        lines = Path(args.mqtt_password_file).read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
    box = args.mqtt_outbox or (f"{args.out}.outbox.sqlite" if args.out else "moevit-outbox.sqlite")
    if not args.mqtt_wait >= 0:
        raise ValueError(f"--mqtt-wait must be >= 0 seconds, got {args.mqtt_wait}")
    return open_uplink(args.mqtt, box, warn=lambda s: print(f"moe-coordinator: uplink: {s}", file=sys.stderr),
                       password=password, ca=args.mqtt_ca, cert=args.mqtt_cert, key=args.mqtt_key,
                       per_image=args.mqtt_images)


def _publish_events(uplink: Any, records: list[dict[str, Any]], runtime: SplitRuntime, job: BatchJob,
                    labels: list[str], taxa: list[Taxon] | None) -> None:
    """Queue the run's event summaries, then wait up to --mqtt-wait for the broker's acknowledgements."""
    from moevit.coordinator.corrections import revise_events

    descriptions = res.descriptions_for(labels, taxa)

    def build(recs: list[Any]) -> dict[str, Any]:
        return res.build_megadetector(recs, labels=labels, fingerprint=runtime.fingerprint,
                                      descriptions=descriptions, gap_s=job.sequence_gap)

    # the camera's deployment is the coordinator's site of sites.yaml (where this camera stands); an event whose
    # label a correction changed is a new revision. The run's corrections are queued again (known ids are no-ops):
    # one written to the results just before a kill still goes out.
    events = revise_events(records, build, deployment=runtime.local_site)
    uplink.corrections([r for r in records if r.get("revision")], res.sequence_group)
    queued = uplink.events(events, build([])["classification_categories"], descriptions or None)
    done = uplink.flush(job.mqtt_wait)
    counts = uplink.outbox.counts()
    print(f"uplink: {len(events)} event summaries ({queued} new) for {uplink.cfg.host}:{uplink.cfg.port}; "
          + ("every queued message acknowledged by the broker" if done else
             f"{counts['pending']} message(s) wait in {uplink.outbox.path} (sent when the broker answers, by this "
             "or the next run)"))


def _codecs(runtime: Any) -> str:
    """Each remote site's token codec, for the start-up line: ``int8 (pi-north, pi-south)``."""
    by: dict[str, list[str]] = {}
    for name, client in runtime.clients.items():
        by.setdefault(client.wire, []).append(name)
    return "; ".join(f"{codec} ({', '.join(names)})" for codec, names in by.items()) or "none (no remote site)"


def _image_files(root: str, report: bool = False) -> list[Path]:
    """The image files under ``root``; with ``report``, says how many other files it leaves out and why."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder")
    files, other, hidden = [], {}, 0
    for p in base.rglob("*"):
        if p.name.startswith("."):  # macOS '._x.jpg' sidecars and other hidden files: not images
            hidden += p.is_file()
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        elif p.is_file():
            other[p.suffix.lower() or "(no suffix)"] = other.get(p.suffix.lower() or "(no suffix)", 0) + 1
    if report and (other or hidden):
        parts = [f"{n} {suffix}" for suffix, n in sorted(other.items())] + ([f"{hidden} hidden (dot-)files"]
                                                                              if hidden else [])
        print(f"moe-coordinator: {root}: skipping {sum(other.values()) + hidden} files that are not "
              f"{'/'.join(IMAGE_EXTENSIONS)} images: {', '.join(parts)}", file=sys.stderr)
    if not files:
        raise FileNotFoundError(f"--images {root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


@dataclass(frozen=True)
class BatchJob:
    """One batch run, as :func:`run_batch` takes it: what to classify (``images``, a folder, or ``data``, a dataset
    spec, with ``split`` and ``limit``), at which ``image_size``, in batches of ``batch_size``; where results go
    (``out``, resumed unless ``restart``), how they are grouped (``sequence_gap`` seconds) and named (``taxa``).
    The CLI builds it from its flags (:meth:`from_args`); a test or another program builds it directly."""

    image_size: int
    images: str | None = None
    data: str | None = None
    split: str = "eval"
    limit: int | None = None
    out: str | None = None
    restart: bool = False
    sequence_gap: float = DEFAULT_SEQUENCE_GAP_S
    taxa: str | None = None
    batch_size: int = 1
    max_megapixels: float = MAX_IMAGE_PIXELS / 1e6  # larger images are refused from their header
    mqtt_wait: float = 10.0  # seconds the uplink may wait for the broker at the end
    rescore: bool = True  # degraded images are classified again once their sites are back (corrections.py)
    rescore_limit: int = DEFAULT_RESCORE_LIMIT
    rescore_max_age: float = DEFAULT_RESCORE_MAX_AGE_S
    rescore_wait: float = 0.0  # seconds to wait at the end for the sites of degraded images

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, image_size: int) -> BatchJob:
        """The job of ``moe-coordinator``'s flags, at ``image_size`` (the flag's, or the model's)."""
        return cls(image_size=image_size, **{f.name: getattr(args, f.name) for f in fields(cls)
                                              if f.name != "image_size"})


@dataclass
class _Item:
    """One input: its name in the results, how to load it (image, true label or None), its field metadata."""

    name: str
    load: Callable[[], tuple[torch.Tensor, int | None]]
    meta: Callable[[], dict[str, Any]] | None = None


def _sources(job: BatchJob, size: int, num_classes: int | None = None,
             model: str = "the model") -> tuple[list[_Item], list[Taxon] | None]:
    """The inputs in order (nothing is decoded yet) and the dataset's taxa when it has some; a data set whose
    class count is not ``num_classes`` is refused."""
    if job.images:
        root = Path(job.images)
        max_pixels = int(job.max_megapixels * 1e6)

        def item(f: Path) -> _Item:
            return _Item(f.relative_to(root).as_posix(), lambda: (load_image(f, size, max_pixels), None),
                         lambda: read_image_meta(f).to_record())

        return [item(f) for f in _image_files(job.images)[: job.limit]], None
    data = open_dataset(job.data, image_size=size, split=job.split)
    if num_classes is not None:
        data.check_classes(num_classes, model)
    n = min(len(data), job.limit or len(data))

    def ditem(i: int) -> _Item:
        def load() -> tuple[torch.Tensor, int | None]:
            x, y = data.load(i)  # never a substitute: an unreadable file is this item's failure
            return x, int(y)

        return _Item(f"{job.data}:{job.split}:{i}", load)

    return [ditem(i) for i in range(n)], data.taxa


def _batches(items: list[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _classify(runtime: SplitRuntime, batch: list[_Item], labels: list[str], failures: dict[str, int],
              latencies: list[float], degraded_by: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Records of one batch, in batch order. ``failures``: failed images per reason; ``degraded_by``: images
    classified under the fallback per site failure."""
    fp = runtime.fingerprint
    records: dict[str, res.ImageRecord] = {}
    good: list[tuple[_Item, torch.Tensor, int | None]] = []
    for it in batch:
        base = res.ImageRecord(it.name, fp)
        try:
            x, y = it.load()
            good.append((it, x, y))
        except UnreadableImageError as e:
            base.error, base.error_kind = f"unreadable image: {e}", "unreadable"
            failures["unreadable image"] = failures.get("unreadable image", 0) + 1
        if it.meta is not None:
            base.extra.update(it.meta())
        records[it.name] = base
    if good:
        try:
            out = runtime.classify(torch.stack([x for _, x, _ in good]))
            latencies += [out.seconds * 1e3] * len(good)
            probs = runtime.calibration.probs(out.logits)  # moe-calibrate's temperature (1 when not calibrated)
            degraded_at = utc_now()
            blank = runtime.calibration.is_blank(probs)
            has_blank = runtime.calibration.blank_class is not None
            finite = torch.isfinite(probs).all(dim=1)
            for j, (it, _, y) in enumerate(good):
                rec = records[it.name]
                if not finite[j]:  # never a NaN in a result: the image is failed, and retried when the run resumes
                    rec.error, rec.error_kind = "the model's output is not finite (NaN or infinity)", "site"
                    failures["output not finite"] = failures.get("output not finite", 0) + 1
                    continue
                top = torch.topk(probs[j], min(res.TOP_K, probs.shape[1]))
                pred = int(top.indices[0])
                rec.prediction, rec.label = pred, labels[pred] if pred < len(labels) else str(pred)
                rec.confidence = res.round_p(top.values[0])
                rec.top5 = [[int(i), res.round_p(p)] for p, i in zip(top.values, top.indices, strict=True)]
                rec.degraded = bool(out.degraded[j])
                if rec.degraded:  # what it lacked, and when: it is re-scored once those sites are back
                    rec.degraded_sites = list(out.missing[j]) if j < len(out.missing) else []
                    rec.degraded_at = degraded_at
                rec.extra.update({"strategy": out.strategy, **out.extra})
                if has_blank:
                    rec.blank = bool(blank[j])
                if y is not None:
                    rec.true = y
            hit = int(out.degraded.sum())  # images of this batch the fallback touched
            for f in out.failures if degraded_by is not None else ():
                degraded_by[f] = degraded_by.get(f, 0) + hit
        except SiteError as e:
            for it, _, _ in good:
                records[it.name].error, records[it.name].error_kind = str(e), "site"
            failures[str(e)] = failures.get(str(e), 0) + len(good)
    return [records[it.name].to_json() for it in batch]


def _taxa(job: BatchJob, dataset_taxa: list[Taxon] | None) -> list[Taxon] | None:
    return res.read_taxa(job.taxa) if job.taxa else dataset_taxa


def _check_taxa(path: str, labels: list[str]) -> None:
    """Warn when a --taxa file names few or none of the model's classes (its names would silently be missing)."""
    keys = {k.casefold() for t in res.read_taxa(path) for k in (t.common_name, t.scientific_name, t.label) if k}
    named = sum(1 for name in labels if name.casefold() in keys)
    if named < len(labels):
        shown = ", ".join(labels[:5]) + (" ..." if len(labels) > 5 else "")
        print(f"moe-coordinator: warning: --taxa {path}: {'no' if not named else f'only {named} of {len(labels)}'} "
              f"class(es) of the model ({shown}) match a taxon's label, common or scientific name; the others get "
              "no scientific name", file=sys.stderr)


def run_batch(runtime: SplitRuntime, job: BatchJob, *, metrics: Any = None,
              sources: tuple[list[_Item], list[Taxon] | None] | None = None, uplink: Any = None) -> dict[str, Any]:
    """Classify the images of ``job`` with ``runtime``: results are written as they are made; returns the
    summary (also printed)."""
    size = job.image_size
    items, dataset_taxa = sources or _sources(job, size)
    labels = list(runtime.model.config.labels)
    taxa = _taxa(job, dataset_taxa)
    out = Path(job.out) if job.out else None
    say = lambda s: print(f"moe-coordinator: {s}", file=sys.stderr)  # noqa: E731
    previous = res.load_previous(out, runtime.fingerprint, restart=job.restart, log=say) if out else {}
    names = {it.name for it in items}
    # Results of earlier runs for images outside this run (a smaller --limit, another folder) are kept, never lost.
    carried = {n: r for n, r in previous.items() if n not in names}
    if out is not None and res.is_jsonl(out):
        if out.exists() and not job.restart:
            old = res.read_jsonl(out)[0]
            carried = {r["file"]: r for r in old
                       if r.get("model") == runtime.fingerprint and r.get("file") not in names}
        out.unlink(missing_ok=True)  # JSON lines: this run's images are classified again (resume is for .json)
    if carried:
        say(f"keeping the results of {len(carried)} images of earlier runs in {out} that this run does not "
            "classify (--restart discards them)")
    reused = {n: r for n, r in previous.items() if n in names}
    todo = [it for it in items if it.name not in reused]
    # degraded images of this input (earlier runs' too) wait here for their sites; corrected: file -> correction
    queue = RescoreQueue(job.rescore_limit, job.rescore_max_age) if job.rescore else None
    corrected: dict[str, dict[str, Any]] = {}
    for r in reused.values() if queue is not None else ():
        queue.add(r)
    if reused:
        say(f"resuming {out}: {len(reused)} of {len(items)} images already done by model {runtime.fingerprint}; "
            f"classifying the other {len(todo)}")
        if metrics is not None:
            metrics.images.labels("reused").inc(len(reused))
    log = res.ResultLog(out if res.is_jsonl(out) else res.partial_path(out)) if out else None
    if log is not None and res.is_jsonl(out) and carried:
        log.append(carried.values())
    new: dict[str, dict[str, Any]] = {}
    latencies: list[float] = []
    failures: dict[str, int] = {}
    degraded_by: dict[str, int] = {}
    shown = failed_shown = 0
    t_start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="classify", dynamic_ncols=True)
    try:
        for batch in _batches(todo, job.batch_size):
            records = _classify(runtime, batch, labels, failures, latencies, degraded_by)
            if log is not None:
                log.append(records)
            if uplink is not None and uplink.cfg.per_image:
                uplink.images(records, res.sequence_group)  # into the outbox; sent in the background
            if queue is not None:
                for rec in records:
                    queue.add(rec, hold=True)
                _rescore(runtime, queue, items, labels, job, corrected, log=log, uplink=uplink, metrics=metrics,
                         write=bar.write, limit=job.batch_size)
            for rec in records:
                new[rec["file"]] = rec
                if metrics is not None and rec.get("error_kind") == "unreadable":
                    metrics.images.labels("unreadable").inc()
                if "error" in rec:
                    failed_shown += 1
                    if failed_shown <= 10:  # named, so a user sees which files to look at without opening --out
                        bar.write(f"  {rec['file']}: FAILED: {rec['error']}")
                elif shown < 10:
                    truth = f" (true {labels[rec['true']]})" if "true" in rec and rec["true"] < len(labels) else ""
                    bar.write(f"  {rec['file']}: {rec['label']} {rec['confidence']:.2f}{truth}"
                              + ("  [degraded]" if rec["degraded"] else ""))
                    shown += 1
            bar.update(len(batch))
        if queue is not None and len(queue):
            _rescore_until(runtime, queue, items, labels, job, corrected, log=log, uplink=uplink, metrics=metrics,
                           write=bar.write, say=say)
    finally:
        bar.close()
        if log is not None:
            log.close()
    elapsed = time.perf_counter() - t_start
    ordered = [corrected.get(it.name) or reused.get(it.name) or new[it.name] for it in items]
    if out is not None:
        _write_results(out, ordered + list(carried.values()), runtime, job, size, labels, taxa)
    if failed_shown > 10:
        say(f"{failed_shown - 10} more failed images not shown" + (f"; every one is in {out}" if out else ""))
    summary = _summary(runtime, ordered, reused, new, latencies, failures, elapsed, out, degraded_by,
                       queue.report() if queue is not None else None)
    if uplink is not None:
        _publish_events(uplink, ordered, runtime, job, labels, taxa)
    return summary


def _rescore(runtime: SplitRuntime, queue: RescoreQueue, items: list[_Item], labels: list[str], job: BatchJob,
             corrected: dict[str, dict[str, Any]], *, log: Any, uplink: Any, metrics: Any,
             write: Callable[[str], None], limit: int | None = None) -> int:
    """Classify again (the full path: ``runtime.classify``) the queued degraded images whose sites' health watches
    say SERVING, at most ``limit``; each one no longer degraded becomes a correction, written to the log (fsync)
    before it goes to the outbox. Returns how many were tried."""
    from moevit.coordinator.corrections import correct

    clients = getattr(runtime, "clients", None) or {}
    ready = queue.ready(lambda site: site not in clients or clients[site].up, limit)
    by_name = {it.name: it for it in items} if ready else {}
    for batch in _batches([w for w in ready if w.file in by_name], job.batch_size):
        fixes = []
        for w, rec in zip(batch, _classify(runtime, [by_name[w.file] for w in batch], labels, {}, []), strict=True):
            if rec.get("error_kind") == "unreadable":
                queue.give_up(w.file, str(rec["error"]))
            elif "error" in rec or rec.get("degraded"):
                queue.still_degraded(w.file, rec.get("degraded_sites") or ())
            else:
                fixes.append(correct(w.record, rec))
                queue.done(w.file)
        if not fixes:
            continue
        if log is not None:
            log.append(fixes)
        if uplink is not None:
            uplink.corrections(fixes, res.sequence_group)
        if metrics is not None:
            metrics.images.labels("corrected").inc(len(fixes))
        for fix in fixes:
            corrected[fix["file"]] = fix
            if len(corrected) <= 10:
                was = fix["corrects"]
                write(f"  {fix['file']}: re-scored: {fix['label']} {fix['confidence']:.2f} (was {was.get('label')} "
                      f"{was.get('confidence', 0):.2f}, degraded: {', '.join(was.get('degraded_sites') or []) or '?'}"
                      " was down)")
    for w in ready:
        if w.file not in by_name and w.file in queue:
            queue.give_up(w.file, "not in this run's input")
    return len(ready)


def _rescore_until(runtime: SplitRuntime, queue: RescoreQueue, items: list[_Item], labels: list[str], job: BatchJob,
                   corrected: dict[str, dict[str, Any]], *, say: Callable[[str], None], **kw: Any) -> None:
    """The end of the run: re-score what is ready now, then wait up to ``job.rescore_wait`` seconds for the
    sites of the rest."""
    deadline = time.monotonic() + job.rescore_wait
    _rescore(runtime, queue, items, labels, job, corrected, **kw)
    if len(queue) and job.rescore_wait > 0:
        say(f"waiting up to {job.rescore_wait:g} s for site(s) {', '.join(queue.waiting_for()) or '(unknown)'} "
            f"to re-score {len(queue)} degraded image(s) (--rescore-wait)")
    while len(queue) and time.monotonic() < deadline:
        if not _rescore(runtime, queue, items, labels, job, corrected, **kw):
            time.sleep(0.2)


def _write_results(out: Path, records: list[dict[str, Any]], runtime: SplitRuntime, job: BatchJob,
                   size: int, labels: list[str], taxa: list[Taxon] | None) -> None:
    if res.is_jsonl(out):
        return  # the log is the output: one line per image, in input order
    cfg = runtime.model.config
    arch = f"{cfg.arch}_moe"
    meta = {"model_fingerprint": runtime.fingerprint, "architecture": arch, "image_size": size,
            "moe_layers": list(cfg.moe.layers) if cfg.moe else [],
            "experts_per_layer": cfg.moe.num_experts if cfg.moe else 0,
            "sites": [runtime.local_site, *runtime.clients], "fallback": runtime.topology.fallback,
            "wire": {name: c.wire for name, c in runtime.clients.items()}, "skip": runtime.skipped(),
            "strategy": getattr(runtime, "strategy", "split")}
    extra = {"moevit_image_root": str(Path(job.images).resolve()) if job.images else f"data:{job.data}"}
    doc = res.build_megadetector(records, labels=labels, fingerprint=runtime.fingerprint,
                                 classifier=f"moevit {arch} {runtime.fingerprint}", classifier_metadata=meta,
                                 descriptions=res.descriptions_for(labels, taxa), gap_s=job.sequence_gap,
                                 completed=datetime.now().astimezone(), extra_info=extra)
    res.write_json_atomic(out, doc)
    res.partial_path(out).unlink(missing_ok=True)


def _summary(runtime: SplitRuntime, records: list[dict[str, Any]], reused: dict[str, Any], new: dict[str, Any],
             latencies: list[float], failures: dict[str, int], elapsed: float, out: Path | None,
             degraded_by: dict[str, int] | None = None, rescore: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    n_new_ok = sum(1 for r in new.values() if "error" not in r)
    labelled = [r for r in ok if "true" in r]
    lat = sorted(latencies)
    traffic = runtime.traffic()
    per_img = max(n_new_ok, 1)
    summary = {
        "images": len(records), "ok": len(ok), "degraded": sum(1 for r in ok if r.get("degraded")),
        "failed": len(records) - len(ok), "reused": len(reused), "classified_now": len(new),
        "blank": sum(1 for r in ok if r.get("blank")) if runtime.calibration.blank_class is not None else None,
        "out": str(out) if out else None,
        "images_per_s": n_new_ok / elapsed if elapsed and n_new_ok else 0.0,
        "latency_ms": {"p50": statistics.median(lat) if lat else None,
                       "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None},
        "accuracy": sum(r["prediction"] == r["true"] for r in labelled) / len(labelled) if labelled else None,
        "per_site": {site: {**t, "bytes_sent_per_image": t["bytes_sent"] / per_img,
                            "bytes_received_per_image": t["bytes_received"] / per_img}
                     for site, t in traffic.items()},
        "tokens_per_site": runtime.tokens_by_site(),
        "tokens_per_expert": {f"{layer}:{e}": v for (layer, e), v in sorted(runtime.context.tokens.items())},
        "failures": failures,
        "degraded_by": degraded_by or {},
        "rescore": rescore,
        "fallback": runtime.policy.fallback,
        "rpc": runtime.counters.as_dict(),
        **({"strategies": runtime.strategy_summary()} if hasattr(runtime, "strategy_summary") else {}),
    }
    _print_summary(summary, runtime)
    return summary


def _print_summary(s: dict[str, Any], runtime: SplitRuntime) -> None:
    p = print
    p(f"\n{s['images']} images: {s['ok']} classified ({s['degraded']} degraded), {s['failed']} failed")
    if s["reused"]:
        p(f"resumed: {s['reused']} reused from the previous run's results, {s['classified_now']} classified now")
    if s.get("blank") is not None:
        cal = runtime.calibration
        rule = (f"P(blank) >= {cal.blank_threshold:.3f}, chosen on {cal.fitted_on}" if cal.blank_threshold is not None
                else "blank is the top class; run moe-calibrate to choose a threshold")
        p(f"blank filter: {s['blank']} of {s['ok']} triggers filtered as empty ({rule})")
    if s["out"]:
        p(f"results in {s['out']}")
    if s["latency_ms"]["p50"] is not None:
        p(f"throughput {s['images_per_s']:.1f} images/s   latency p50 {s['latency_ms']['p50']:.1f} ms   "
          f"p99 {s['latency_ms']['p99']:.1f} ms (per batch)")
    if s["accuracy"] is not None:
        p(f"accuracy {s['accuracy']:.4f}")
    p(f"{'site':<14}{'address':<22}{'calls':>7}{'bytes sent/img':>16}{'bytes recv/img':>16}{'tokens':>9}")
    for site, t in s["per_site"].items():
        p(f"{site:<14}{runtime.topology.site(site).address:<22}{t['calls']:>7}{t['bytes_sent_per_image']:>16.0f}"
          f"{t['bytes_received_per_image']:>16.0f}{t['tokens']:>9}")
    local = s["tokens_per_site"].get(runtime.local_site, 0)
    p(f"{runtime.local_site:<14}{'(in-process)':<22}{'':>7}{'':>16}{'':>16}{local:>9}")
    per_layer: dict[str, list[str]] = {}
    for key, v in s["tokens_per_expert"].items():
        layer, e = key.split(":")
        per_layer.setdefault(layer, []).append(f"{e}:{v}")
    for layer, items in per_layer.items():
        p(f"layer {layer} tokens per expert: " + " ".join(items))
    rpc = s["rpc"]
    if rpc["retries"] or rpc["hedges"] or rpc["fallback_tokens"]:
        p(f"rpc: {rpc['calls']} calls, {rpc['retries']} retried on another replica, {rpc['hedges']} hedged "
          f"({rpc['hedge_wins']} hedges won, {rpc['cancelled']} losers cancelled); {rpc['fallback_tokens']} tokens "
          f"under fallback {s['fallback']!r}")
    for f, count in s["degraded_by"].items():
        p(f"degraded ({count} images, classified under fallback {s['fallback']!r}): {f}")
    if s.get("rescore"):
        from moevit.coordinator.corrections import summary_lines

        for line in summary_lines(s["rescore"]):
            p(line)
    for line in strategy_lines(s["strategies"]) if "strategies" in s else ():
        p(line)
    for f, count in s["failures"].items():
        p(f"failed ({count} images): {f}")


def _classify_security(topology: Topology) -> tuple[grpc.ServerCredentials | None, str | None]:
    """Credentials and bearer token of the Classify server: the coordinator site's ``tls`` and ``token_file``.

    Checked before the model loads, so a bad certificate or token file fails at once, naming the file.
    """
    from moevit_rpc.channels import check_tls_files
    from moevit_rpc.security import server_credentials

    site = topology.site(topology.coordinator)
    token = site.token()  # TopologyError when unreadable or empty
    if site.tls is None:
        return None, token
    check_tls_files(site.tls)  # ValueError naming the file
    return server_credentials(site.tls.ca, site.tls.cert, site.tls.key), token


def _threads(given: int | None, runtime: SplitRuntime, *, started: bool) -> int:
    """Torch threads of the coordinator: ``--threads``, else 1 beside workers it started, else the cores left
    after one per worker site on this machine (started by hand or not): OpenMP threads that outnumber the cores
    spin against the workers' (issue 22, 2 cores: 1.5 images/s by hand vs 42-93 when it started them)."""
    from moevit_rpc.channels import is_loopback

    if given:
        return given
    if started:
        return 1
    local = sum(1 for c in runtime.clients.values() if is_loopback(c.address.rsplit(":", 1)[0]))
    return max(1, torch.get_num_threads() - local)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve:  # the Classify server: before any other thread allocates, so what they free stays returnable
        from moevit_rpc.memory import one_arena

        one_arena()
    logging.basicConfig(level=logging.WARNING, format="moe-coordinator: %(asctime)s %(message)s", datefmt="%H:%M:%S")
    # CoordinatorError, LaunchError and SiteError are RuntimeErrors: named here, they are one line (exit 2) too
    return run_cli("moe-coordinator", lambda: _run(args), errors=(*USAGE_ERRORS, CoordinatorError, LaunchError,
                                                                  SiteError), interrupted=lambda: _resume_hint(args))


def _skip_layers(text: str) -> tuple[int, ...]:
    """``--skip-layers``: :func:`moevit.offwire.parse_layer_list`, its ValueError as argparse's usage error."""
    try:
        return parse_layer_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted run leaves: where its results so far are, and that the same command resumes."""
    if args.out and not res.is_jsonl(args.out) and res.partial_path(args.out).exists():
        return f"; results so far in {res.partial_path(args.out)}: run the same command again to resume"
    return ""


def _run(args: argparse.Namespace) -> int:
    """The run the flags ask for (a batch run or the Classify server); stops what it started on the way out."""
    workers = None
    offload_server = None
    runtime = None
    uplink = None
    out_lock = None
    try:
        topology = load_topology(args.topology)
        if args.as_site or args.strategy:
            import dataclasses

            if args.as_site and args.as_site not in topology.sites:
                raise CoordinatorError(f"--as-site {args.as_site}: not a site of {args.topology} "
                                       f"({', '.join(topology.sites)})")
            topology = dataclasses.replace(topology, coordinator=args.as_site or topology.coordinator,
                                           strategy=args.strategy or topology.strategy)
        if not (args.images or args.data or args.serve):
            raise CoordinatorError("nothing to do: give --images DIR, --data SPEC or --serve ADDR")
        if args.batch_size < 1:
            raise CoordinatorError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.image_size is not None and not 8 <= args.image_size <= 2048:
            raise CoordinatorError(f"--image-size must be 8-2048 pixels, got {args.image_size}")
        if not 0 < args.max_megapixels <= MAX_IMAGE_PIXELS_CEILING / 1e6:
            raise CoordinatorError(f"--max-megapixels must be in (0, {MAX_IMAGE_PIXELS_CEILING / 1e6:g}], "
                                   f"got {args.max_megapixels}")
        if args.limit is not None and args.limit < 1:
            raise CoordinatorError(f"--limit must be >= 1, got {args.limit}")
        if args.max_batch < 1:
            raise CoordinatorError(f"--max-batch must be >= 1, got {args.max_batch}")
        if not args.max_wait_ms >= 0:
            raise CoordinatorError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
        if not args.sequence_gap >= 0:
            raise CoordinatorError(f"--sequence-gap must be >= 0 seconds, got {args.sequence_gap}")
        if args.rescore_limit < 0:
            raise CoordinatorError(f"--rescore-limit must be >= 0, got {args.rescore_limit}")
        for flag, value in (("--rescore-max-age", args.rescore_max_age), ("--rescore-wait", args.rescore_wait)):
            if not value >= 0:
                raise CoordinatorError(f"{flag} must be >= 0 seconds, got {value}")
        if args.out and Path(args.out).is_dir():
            raise CoordinatorError(f"--out {args.out} is a folder; give a file name ending in .json or .jsonl")
        if args.out and not args.serve:  # held until the run ends: a second run on the same --out is refused
            out_lock = res.OutputLock(args.out)
        # Every input is checked before the model loads and workers start: a typo is one line at once.
        if args.images:
            _image_files(args.images, report=True)
        if args.data:
            open_dataset(args.data, image_size=8, split=args.split)  # spec, folder, CSVs, split
        if args.taxa:
            res.read_taxa(args.taxa)
        if not args.out and not args.serve:
            print("moe-coordinator: warning: no --out: nothing is saved (the console shows the first 10 images); "
                  "give --out results.json to keep every result", file=sys.stderr)
        if args.serve:
            from moevit_rpc.listen import check_free

            check_free(args.serve, "--serve")
        credentials, token = _classify_security(topology) if args.serve else (None, None)
        skip_rules = rules_from_options(threshold=args.skip_threshold, action=args.skip_action,
                                        match=args.skip_match, capacity=args.skip_capacity,
                                        analysis=args.skip_background, layers=args.skip_layers)
        onnx = onnx_camera_config(args, args.model or topology.model or "model")
        runtime = open_runtime(topology, model_path=args.model, wire=args.wire, skip=skip_rules,
                               deadline_s=args.deadline, onnx=onnx, image_size=args.image_size)
        if runtime.camera is not runtime.model:
            print(f"moe-coordinator: {runtime.camera.describe()}", file=sys.stderr)
        metrics = None
        if args.metrics_port is not None:
            from moevit.coordinator.metrics import CoordinatorMetrics

            metrics = CoordinatorMetrics()
            metrics.instrument(runtime)
            if hasattr(runtime, "links"):
                from moevit.coordinator.strategies import LinkCollector

                metrics.registry.register(LinkCollector(runtime))
            host, port = metrics.serve(args.metrics_port)
            print(f"moe-coordinator: metrics on http://{host}:{port}/metrics", file=sys.stderr)
        size = args.image_size or runtime.model.config.image_size
        job = BatchJob.from_args(args, image_size=size)
        sources = None if args.serve else _sources(job, size, runtime.model.config.num_classes,
                                                   f"model {runtime.fingerprint}")
        if args.taxa:
            _check_taxa(args.taxa, list(runtime.model.config.labels))
        if not args.no_spawn:
            workers = ensure_workers(args.topology, runtime.clients, model=args.model, threads=args.worker_threads,
                                     log=lambda s: print(f"moe-coordinator: {s}", file=sys.stderr))
            if getattr(runtime, "offload", None) is not None:  # offload-image/adaptive: the site's whole-model server
                offload_server = ensure_classify_server(
                    args.topology, runtime.offload.site, runtime.offload.address, check=runtime.offload.health,
                    model=args.model, threads=args.worker_threads,
                    log=lambda s: print(f"moe-coordinator: {s}", file=sys.stderr))
        threads = _threads(args.threads, runtime, started=bool(workers and workers.procs))
        torch.set_num_threads(threads)
        runtime.check_workers()
        print(f"model {runtime.fingerprint} ({runtime.model.config.arch}, MoE layers "
              f"{list(runtime.model.config.moe.layers)}), sites {', '.join([topology.coordinator, *runtime.clients])}"
              f", codecs {_codecs(runtime)} on the wire, fallback {topology.fallback}, {threads} torch thread(s), "
              f"strategy {getattr(runtime, 'strategy', 'split')}", file=sys.stderr)
        if args.serve:
            from moevit.coordinator.server import serve

            unreadable = None if metrics is None else metrics.images.labels("unreadable").inc
            asyncio.run(serve(runtime, args.serve, image_size=size, max_batch=args.max_batch,
                              max_wait_ms=args.max_wait_ms, credentials=credentials, token=token,
                              on_unreadable=unreadable, max_pixels=int(args.max_megapixels * 1e6)))
            return 0
        uplink = _open_uplink(args)
        summary = run_batch(runtime, job, metrics=metrics, sources=sources, uplink=uplink)
        return 0 if summary["ok"] or not summary["images"] else 1
    finally:
        if out_lock is not None:
            out_lock.release()
        if uplink is not None:
            uplink.close()
        if runtime is not None:
            runtime.close()
        if offload_server is not None:
            offload_server.stop()
        if workers is not None:
            workers.stop()


if __name__ == "__main__":
    # how the tests, the attacks and the local harness start coordinators: everything main started is closed and
    # stopped by its return (_run's finally), so the process ends then, without the interpreter's teardown
    exit_now(main())
