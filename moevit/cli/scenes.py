"""``moe-scenes``: write the camera-trap-like scenes of :mod:`moevit.scenes` as JPEG files, one sub-folder per class.

    moe-scenes --out data/scenes                      # 10 species x 200 + 200 blank, 128 px
    moe-scenes --out data/scenes --blank 0.5 --size 256 --per-class 100

Every file carries EXIF ``DateTimeOriginal`` (frames of a burst 1 s apart, bursts at least 20 minutes apart),
``Make``/``Model`` and a ``BodySerialNumber``, so ``moe-coordinator --data folder:DIR`` groups the bursts into
sequences. ``manifest.csv`` beside the class folders lists file, class, burst, frame, time and day/night.
``--data folder:DIR`` then reads the same images and labels as the spec printed at the end (up to JPEG loss).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from PIL import Image

from moevit.cli.common import run_cli
from moevit.scenes import SceneSpec, _is_night, burst_time, class_names, iter_frames

EXIF_IFD, TAG_MAKE, TAG_MODEL, TAG_DATETIME_ORIGINAL, TAG_BODY_SERIAL = 0x8769, 0x010F, 0x0110, 0x9003, 0xA431


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-scenes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SceneSpec()
    ap.add_argument("--out", required=True, help="folder to write (must be empty or not exist)")
    ap.add_argument("--classes", type=int, default=d.classes, help=f"species (default {d.classes})")
    ap.add_argument("--per-class", type=int, default=d.per_class, help=f"images per species (default {d.per_class})")
    ap.add_argument("--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})")
    ap.add_argument("--blank", type=float, default=None,
                    help="share of all images that are blank (default: as many as one species)")
    ap.add_argument("--night", type=float, default=d.night, help=f"share of night bursts (default {d.night})")
    ap.add_argument("--morphs", type=int, choices=(0, 1), default=d.morphs,
                    help="1: pairs of species in crossed morphs, told apart only by shape and coat together")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--serial", default="SCN0001", help="camera serial written to EXIF")
    return ap


def write_scenes(spec: SceneSpec, out: Path, *, quality: int = 90, serial: str = "SCN0001") -> dict[str, int]:
    """Write every frame of ``spec`` under ``out``; returns images per class."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new folder")
    for name in class_names(spec):
        (out / name).mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with (out / "manifest.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "class", "burst", "frame", "datetime", "night"])
        for frame, pixels in iter_frames(spec):
            rel = f"{frame.name}/{frame.name}_{frame.class_burst:04d}_{frame.frame}.jpg"
            when = burst_time(spec, frame)
            exif = Image.Exif()
            exif[TAG_MAKE], exif[TAG_MODEL] = "moevit", "scenes"
            sub = exif.get_ifd(EXIF_IFD)
            sub[TAG_DATETIME_ORIGINAL] = when.strftime("%Y:%m:%d %H:%M:%S")
            sub[TAG_BODY_SERIAL] = serial
            Image.fromarray(pixels).save(out / rel, quality=quality, exif=exif)
            rows.writerow([rel, frame.name, frame.burst, frame.frame, when.isoformat(),
                           int(_is_night(spec, frame.burst))])
            counts[frame.name] = counts.get(frame.name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if not 1 <= args.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {args.quality}")
        spec = SceneSpec(classes=args.classes, per_class=args.per_class, size=args.size, blank=args.blank,
                         seed=args.seed, night=args.night, morphs=args.morphs)
        t0 = time.perf_counter()
        counts = write_scenes(spec, Path(args.out), quality=args.quality, serial=args.serial)
        total = sum(counts.values())
        print(f"wrote {total} images in {len(counts)} class folders under {args.out} in "
              f"{time.perf_counter() - t0:.1f} s ({counts.get('blank', 0)} blank)")
        return 0

    return run_cli("moe-scenes", body)


if __name__ == "__main__":
    sys.exit(main())
