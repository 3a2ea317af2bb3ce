"""Shared pieces of the console scripts: error reporting, thread settings, model loading, the ONNX camera flags."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from moevit.cli.runner import run_cli  # noqa: F401 (re-exported: the scripts import it from here)

if TYPE_CHECKING:
    from moevit.onnx_camera import OnnxCameraConfig


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def add_onnx_camera_args(parser: Any, runs: str = "the model") -> None:
    """The flags that run ``runs`` on onnxruntime instead of torch (moe-eval, moe-coordinator; docs/onnx.md):
    ``--backend``, ``--precision``, ``--calibrate``, ``--calibrate-images``, ``--onnx-cache``. ``parser`` is a
    parser or an argument group; :func:`onnx_camera_config` checks what was given."""
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help=f"what runs {runs}: torch (default) or onnxruntime, the model (BatchNorms folded) "
                        "exported to ONNX once per model and image size (docs/onnx.md)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="with --backend onnx: float32 graphs, or int8 (static quantisation; needs --calibrate)")
    parser.add_argument("--calibrate", metavar="SPEC", help="with --precision int8: dataset spec whose train split "
                        "calibrates the int8 ranges (e.g. digits)")
    parser.add_argument("--calibrate-images", type=int, default=64, metavar="N",
                        help="images of --calibrate used (evenly spaced; default 64)")
    parser.add_argument("--onnx-cache", metavar="DIR",
                        help="folder of the exported graphs (default: <model>.onnx-cache/ beside the model)")


def onnx_camera_config(args: Any, model: str | Path) -> OnnxCameraConfig | None:
    """The onnxruntime settings :func:`add_onnx_camera_args`' flags ask for in ``args`` (parsed; ``args.threads``
    sets onnxruntime's threads, default 1; None: torch runs the model), checked before the model loads: ValueError,
    one line, naming the flag (int8 without --calibrate, a bad --calibrate spec)."""
    if args.backend != "onnx":
        if args.precision != "fp32" or args.calibrate:
            raise ValueError("--precision int8 and --calibrate need --backend onnx")
        return None
    from moevit.data import open_dataset
    from moevit.onnx_camera import OnnxCameraConfig

    if args.calibrate:
        open_dataset(args.calibrate, image_size=8, split="train")  # a bad spec fails before the model loads
    model = Path(model)
    cache = Path(args.onnx_cache) if args.onnx_cache else model.with_name(model.name + ".onnx-cache")
    return OnnxCameraConfig(cache_dir=cache, precision=args.precision, threads=args.threads or 1,
                            calibrate=args.calibrate, calibrate_images=args.calibrate_images)


class StageBar:
    """A progress bar over named stages: call it with each stage's name as the stage starts."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="stage", dynamic_ncols=True)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()
