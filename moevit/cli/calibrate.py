"""``moe-calibrate --model M.safetensors --data SPEC``: fit confidence calibration and the blank filter on ``val``.

Run after ``moe-train`` or ``moe-convert``. Fits one temperature on the val split (top-1 never changes), chooses the
blank threshold on val for the asked animal recall (models with a ``blank`` class), reports both on the eval split,
writes a reliability diagram (PNG, eval, before and after) and stores the result in the checkpoint's metadata
(``--out`` for a copy), where moe-coordinator, moe-eval and the Classify server read it.

    moe-calibrate --model runs/scenes/best.safetensors --data scenes --plot reliability.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moevit.calibration import (
    Calibration,
    blank_threshold_for_recall,
    collect_logits,
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
    write_calibration,
)
from moevit.checkpoint import load_checkpoint
from moevit.cli.common import run_cli, set_threads
from moevit.data import open_dataset
from moevit.kinds import BLANK, class_kinds


def calibrate(model: torch.nn.Module, val, test, *, recall: float = 0.96, fitted_on: str = "",
              plot: str | Path | None = None, batch_size: int = 64) -> Calibration:
    """Fit on ``val``, report on ``test`` (both datasets); returns the calibration with its figures."""
    labels = list(model.config.labels)
    zv, yv = collect_logits(model, val, batch_size)
    ze, ye = collect_logits(model, test, batch_size)
    t = fit_temperature(zv, yv)
    before_v, after_v = zv.softmax(-1), (zv / t).softmax(-1)
    before_e, after_e = ze.softmax(-1), (ze / t).softmax(-1)
    report: dict = {
        "temperature": round(t, 4), "val_images": len(yv), "eval_images": len(ye),
        "ece_val_before": round(expected_calibration_error(before_v, yv), 4),
        "ece_val_after": round(expected_calibration_error(after_v, yv), 4),
        "ece_eval_before": round(expected_calibration_error(before_e, ye), 4),
        "ece_eval_after": round(expected_calibration_error(after_e, ye), 4),
        "eval_top1": round(float((ze.argmax(-1) == ye).float().mean()), 4),
    }
    kinds = class_kinds(labels)
    blank = next((i for i, k in kinds.items() if k == BLANK), None)
    threshold = None
    if blank is not None:
        animal_v = torch.tensor([int(y) not in kinds for y in yv])
        threshold = blank_threshold_for_recall(after_v[:, blank], animal_v, recall)
        animal_e = torch.tensor([int(y) not in kinds for y in ye])
        blank_e = ye == blank
        filtered = after_e[:, blank].double() >= threshold
        report.update({
            "blank_class": blank, "target_animal_recall": recall, "blank_threshold": round(threshold, 6),
            "val_animal_recall": round(float((after_v[animal_v, blank].double() < threshold).float().mean()), 4),
            "eval_animal_recall": round(float((~filtered[animal_e]).float().mean()), 4)
            if animal_e.any() else None,
            "eval_blanks_filtered": round(float(filtered[blank_e].float().mean()), 4) if blank_e.any() else None,
            "eval_triggers_filtered": round(float(filtered.float().mean()), 4),
        })
    if plot:
        reliability_diagram({"before": before_e, f"after (T={t:.2f})": after_e}, ye, plot,
                            title=f"reliability on eval ({len(ye)} images)")
        report["plot"] = str(plot)
    return Calibration(t, blank, threshold, fitted_on, report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a moevit .safetensors checkpoint (calibrated in place)")
    ap.add_argument("--data", required=True, help="the dataset spec the model was trained on")
    ap.add_argument("--seed", type=int, default=0, help="seed of the holdout splits (as in moe-train)")
    ap.add_argument("--recall", type=float, default=0.96, help="animal recall the blank threshold keeps on val "
                    "(default 0.96)")
    ap.add_argument("--out", help="write the calibrated checkpoint here instead of updating --model")
    ap.add_argument("--plot", help="reliability diagram PNG (eval split, before and after)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)

    def body() -> int:
        if not 0 < args.recall <= 1:
            raise ValueError(f"--recall must be in (0, 1], got {args.recall}")
        set_threads(args.threads)
        model = load_checkpoint(args.model)
        size = model.config.image_size
        val = open_dataset(args.data, image_size=size, split="val", seed=args.seed)
        test = open_dataset(args.data, image_size=size, split="eval", seed=args.seed)
        for d in (val, test):
            d.check_classes(model.config.num_classes, args.model)
        cal = calibrate(model, val, test, recall=args.recall, fitted_on=f"{args.data} val (seed {args.seed})",
                        plot=args.plot, batch_size=args.batch_size)
        target = write_calibration(args.model, cal, args.out)
        r = cal.report
        if args.json:
            print(json.dumps(r))
        else:
            print(f"temperature {cal.temperature:.3f} (fitted on val, {r['val_images']} images)")
            print(f"ECE val  {r['ece_val_before']:.4f} -> {r['ece_val_after']:.4f}")
            print(f"ECE eval {r['ece_eval_before']:.4f} -> {r['ece_eval_after']:.4f} ({r['eval_images']} images)")
            if cal.blank_threshold is not None:
                print(f"blank threshold P(blank) >= {cal.blank_threshold:.4f} (val animal recall "
                      f"{r['val_animal_recall']:.3f}); eval: animal recall {r['eval_animal_recall']}, blanks "
                      f"filtered {r['eval_blanks_filtered']}, triggers filtered {r['eval_triggers_filtered']}")
            if args.plot:
                print(f"reliability diagram: {args.plot}")
            print(f"stored in {target}")
        return 0

    return run_cli("moe-calibrate", body)


if __name__ == "__main__":
    sys.exit(main())
