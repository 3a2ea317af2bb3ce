"""Cut a checkpoint's classifier to its first N classes (rows kept, not re-initialised): the gate's control of
issue 17, the pretrained trunk with its own head on a subset of its own classes.

    python bench/cut_head.py --model weights/pretrain-mobilevitv2_050-96.safetensors --keep 11 \
        --out runs/headkept/init.safetensors    # blank, zoo1_000 .. zoo1_009 = scenes:classes=10,zoo=1
"""

from __future__ import annotations

import argparse
import sys

import moevit
from moevit.checkpoint import load_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a moevit checkpoint with labels")
    ap.add_argument("--keep", type=int, required=True, help="classes to keep, the first N of its labels")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src = load_checkpoint(args.model)
    n = src.config.num_classes
    if not 1 <= args.keep <= n:
        print(f"cut_head: --keep {args.keep}; {args.model} has {n} classes", file=sys.stderr)
        return 2
    keep = list(range(args.keep))
    labels = tuple(src.config.labels[i] for i in keep) if src.config.labels else None
    dst = moevit.build_model(moevit.ModelConfig(arch=src.config.arch, num_classes=args.keep, labels=labels,
                                                image_size=src.config.image_size))
    state = src.state_dict()
    state["head.fc.weight"] = state["head.fc.weight"][keep].clone()
    state["head.fc.bias"] = state["head.fc.bias"][keep].clone()
    dst.load_state_dict(state)
    save_checkpoint(dst, args.out)
    print(f"{args.out}: {args.keep} of {n} classes: {', '.join(labels or ())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
