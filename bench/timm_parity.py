"""Check that moevit's MobileViTV2 computes what timm's does, without timm: against timm's stored logits.

timm is not a dependency (it pulls in torchvision and a CUDA torch), so its answers are kept in
``bench/results/timm_reference.safetensors``: for every width, the logits timm computed for one seeded image at each
of four sizes, with the weights :func:`moevit.parity.reference_weights` draws from the parameter names and shapes
(the same state_dict keys in both: the model loads timm's weights strictly). The file's metadata holds timm's version
and the script that made it (run once, with timm installed apart from the project). This check rebuilds the same weights
and images in moevit and compares, in both memory formats:

    .venv/bin/python bench/timm_parity.py          # writes bench/results/timm_parity.json; exit 1 beyond --tol
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import moevit  # noqa: E402
from moevit.parity import SIZES, reference_input, reference_weights  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "results" / "timm_reference.safetensors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=str(REFERENCE))
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |difference| of a logit accepted")
    ap.add_argument("--out", default="bench/results/timm_parity.json")
    args = ap.parse_args()
    stored = load_file(args.reference)
    with safe_open(args.reference, "pt") as f:
        meta = f.metadata()
    results, worst = {}, 0.0
    for name in moevit.list_models():
        ours = moevit.create_model(name).eval()
        ours.load_state_dict(reference_weights(ours), strict=True)
        row = {}
        for h, w in SIZES:
            ref = stored[f"{name}/{h}x{w}"]
            x = reference_input(h, w)
            with torch.no_grad():
                b = ours(x)
                c = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
                ours.to(memory_format=torch.contiguous_format)
            row[f"{h}x{w}"] = {"max_abs_diff": float((ref - b).abs().max()),
                               "channels_last_max_abs_diff": float((ref - c).abs().max()),
                               "max_abs_logit": float(ref.abs().max())}
            worst = max(worst, row[f"{h}x{w}"]["max_abs_diff"], row[f"{h}x{w}"]["channels_last_max_abs_diff"])
        results[name] = row
        print(name, {k: v["max_abs_diff"] for k, v in row.items()})
    write_result(args.out, {"timm_version": meta.get("timm_version"), "reference": args.reference,
                            "torch_of_reference": meta.get("torch_version"), "tol": args.tol,
                            "max_abs_diff": worst, "models": results})
    print(f"largest difference from timm's logits: {worst:.3g} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
