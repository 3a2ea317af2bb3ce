"""Field events on the scenes bursts: calibration (ECE before/after), the blank filter, and the sequence label
against per-image labels.

For each checkpoint (one per training seed, all trained on the same ``scenes:`` spec and split seed):

1. :func:`moevit.cli.calibrate.calibrate` fits the temperature and the blank threshold (96 % animal recall) on
   ``val`` and reports ECE, animal recall and the blanks filtered on ``eval``;
2. every eval frame becomes a results record (calibrated top-5, the blank flag, its burst's capture time), the
   records go through ``build_megadetector`` and ``events_from_megadetector`` exactly as a run's would, and the
   event label (top-1 of the summary, or blank) is compared with the per-image labels, per frame and per event.

    python bench/bench_field_events.py --data scenes:classes=4,per_class=120,size=64,blank=0.5,split_seed=0 \\
        --models runs/s0/best.safetensors runs/s1/best.safetensors runs/s2/best.safetensors

Writes bench/results/field_events.json and bench/results/reliability_scenes.png (the first model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from moevit.coordinator import results as res
from moevit.coordinator.events import events_from_megadetector

from moevit.calibration import collect_logits
from moevit.checkpoint import load_checkpoint
from moevit.cli.calibrate import calibrate
from moevit.data import open_dataset, parse_spec
from moevit.kinds import BLANK, class_kinds
from moevit.scenes import burst_layout, burst_time

RESULTS = Path(__file__).resolve().parent / "results"


def event_vs_image(model, data_spec: str, cal) -> dict:
    """Per-frame and per-event accuracy of the per-image labels and of the event label on the eval split."""
    labels = list(model.config.labels)
    blank = next((i for i, k in class_kinds(labels).items() if k == BLANK), None)
    test = open_dataset(data_spec, image_size=model.config.image_size, split="eval")
    scene = parse_spec(data_spec).scenes.scene
    frames = burst_layout(scene)
    z, y = collect_logits(model, test)
    probs = cal.probs(z)
    is_blank = cal.is_blank(probs)
    records, truth, by_file = [], {}, {}
    for j, item in enumerate(test.items):
        f = frames[item]
        top = torch.topk(probs[j], min(5, probs.shape[1]))
        file = f"cam/b{f.burst:05d}_{f.frame}.jpg"
        rec = {"file": file, "model": "bench", "prediction": int(top.indices[0]),
               "top5": [[int(i), res.round_p(p)] for p, i in zip(top.values, top.indices, strict=True)],
               "degraded": False, "datetime": burst_time(scene, f).isoformat(), "time_source": "exif:DateTimeOriginal",
               "time_flags": []}
        if blank is not None:
            rec["blank"] = bool(is_blank[j])
        records.append(rec)
        truth[file] = int(y[j])
        by_file[file] = j
    doc = res.build_megadetector(records, labels=labels, fingerprint="bench", gap_s=60)
    events = events_from_megadetector(doc)
    members: dict[str, list[str]] = {}
    for im in doc["images"]:
        members.setdefault(im["seq_id"], []).append(im["file"])

    def image_label(j: int, filtered: bool) -> int:
        if filtered and blank is not None and bool(is_blank[j]):
            return blank
        if filtered and blank is not None:  # kept by the filter: its best non-blank class
            p = probs[j].clone()
            p[blank] = -1
            return int(p.argmax())
        return int(probs[j].argmax())

    frame_hits = {"image_top1": 0, "image_filtered": 0, "event": 0}
    event_hits = {"image_majority": 0, "event": 0}
    # species alone (animal frames and events): each frame's best non-blank class against the event's top-1
    animal_frames = {"image": 0, "event": 0, "n": 0}
    animal_events = {"image_majority": 0, "event": 0, "n": 0}
    pure = 0
    for e in events:
        files = members[e.event_id]
        true = {truth[f] for f in files}
        pure += len(true) == 1
        t = truth[files[0]]
        label = blank if e.blank else e.top[0][0]
        event_hits["event"] += label == t
        votes = [image_label(by_file[f], True) for f in files]
        event_hits["image_majority"] += max(sorted(set(votes)), key=votes.count) == t
        for f in files:
            j = by_file[f]
            frame_hits["image_top1"] += image_label(j, False) == truth[f]
            frame_hits["image_filtered"] += image_label(j, True) == truth[f]
            frame_hits["event"] += label == truth[f]
        if t != blank:
            species = [_best_non_blank(probs[by_file[f]], blank) for f in files]
            event_species = max(((c, p) for c, p in e.top if c != blank), key=lambda cp: cp[1], default=(-1, 0))[0]
            animal_frames["n"] += len(files)
            animal_frames["image"] += sum(c == t for c in species)
            animal_frames["event"] += len(files) * (event_species == t)
            animal_events["n"] += 1
            animal_events["image_majority"] += max(sorted(set(species)), key=species.count) == t
            animal_events["event"] += event_species == t
    n, m = len(records), len(events)
    af, ae = animal_frames.pop("n"), animal_events.pop("n")
    return {"eval_frames": n, "events": m, "events_of_one_burst": pure,
            "frame_accuracy": {k: round(v / n, 4) for k, v in frame_hits.items()},
            "event_accuracy": {k: round(v / m, 4) for k, v in event_hits.items()},
            "animal_frames": af, "animal_events": ae,
            "species_frame_accuracy": {k: round(v / max(af, 1), 4) for k, v in animal_frames.items()},
            "species_event_accuracy": {k: round(v / max(ae, 1), 4) for k, v in animal_events.items()}}


def _best_non_blank(p: torch.Tensor, blank: int | None) -> int:
    q = p.clone()
    if blank is not None:
        q[blank] = -1
    return int(q.argmax())


def _interval(xs: list[float]) -> dict:
    """Mean and a 95 % t interval over the seeds."""
    from scipy import stats

    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": round(mean, 4), "values": xs}
    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "values": xs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--recall", type=float, default=0.96)
    ap.add_argument("--out", default=str(RESULTS / "field_events.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for k, path in enumerate(args.models):
        model = load_checkpoint(path)
        size = model.config.image_size
        val = open_dataset(args.data, image_size=size, split="val")
        test = open_dataset(args.data, image_size=size, split="eval")
        plot = RESULTS / "reliability_scenes.png" if k == 0 else None
        cal = calibrate(model, val, test, recall=args.recall, fitted_on=f"{args.data} val", plot=plot)
        ev = event_vs_image(model, args.data, cal)
        runs.append({"model": str(path), "calibration": cal.report, **ev})
        print(json.dumps(runs[-1]), file=sys.stderr)
    keys = {
        "ece_eval_before": lambda r: r["calibration"]["ece_eval_before"],
        "ece_eval_after": lambda r: r["calibration"]["ece_eval_after"],
        "eval_animal_recall": lambda r: r["calibration"].get("eval_animal_recall"),
        "eval_blanks_filtered": lambda r: r["calibration"].get("eval_blanks_filtered"),
        "frame_acc_image_top1": lambda r: r["frame_accuracy"]["image_top1"],
        "frame_acc_image_filtered": lambda r: r["frame_accuracy"]["image_filtered"],
        "frame_acc_event": lambda r: r["frame_accuracy"]["event"],
        "event_gain_over_image_top1": lambda r: r["frame_accuracy"]["event"] - r["frame_accuracy"]["image_top1"],
        "event_acc_image_majority": lambda r: r["event_accuracy"]["image_majority"],
        "event_acc_event_label": lambda r: r["event_accuracy"]["event"],
        "species_frame_acc_image": lambda r: r["species_frame_accuracy"]["image"],
        "species_frame_acc_event": lambda r: r["species_frame_accuracy"]["event"],
        "species_gain_event_over_image": lambda r: r["species_frame_accuracy"]["event"]
        - r["species_frame_accuracy"]["image"],
        "species_event_acc_image_majority": lambda r: r["species_event_accuracy"]["image_majority"],
        "species_event_acc_event_label": lambda r: r["species_event_accuracy"]["event"],
    }
    summary = {k: _interval([round(f(r), 4) for r in runs]) for k, f in keys.items()
               if all(f(r) is not None for r in runs)}
    doc = {"command": "python bench/bench_field_events.py " + " ".join(argv or sys.argv[1:]),
           "data": args.data, "target_animal_recall": args.recall, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
