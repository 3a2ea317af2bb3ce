"""Check that moevit's MobileViTV2 computes what timm's does: same state_dict, bit-identical logits.

timm is not a dependency (it drags in torchvision and a CUDA torch). To run this check, install timm without its
dependencies into a scratch folder and point ``--timm-path`` at it:

    .venv/bin/pip install --no-deps --target /tmp/timmpkg 'timm==1.0.*'
    .venv/bin/python bench/timm_parity.py --timm-path /tmp/timmpkg

timm imports torchvision only for its data pipeline, which this check never uses; a stand-in module satisfies
those imports (nothing of it is called). Writes bench/results/timm_parity.json.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import moevit  # noqa: E402


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _Unused(metaclass=_Meta):
    def __init__(self, *a, **k):
        pass


class _StandIn(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Unused,), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm-path", required=True, help="folder holding the timm package")
    ap.add_argument("--out", default="bench/results/timm_parity.json")
    args = ap.parse_args()
    sys.path.insert(0, args.timm_path)
    sys.meta_path.insert(0, _TorchvisionStandIn())
    import timm  # noqa: PLC0415 - optional, only for this check

    torch.manual_seed(0)
    results = {}
    for name in moevit.list_models():
        ref = timm.create_model(name).eval()
        with torch.no_grad():  # non-trivial norm statistics and affines
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                    m.weight.normal_(1, 0.1)
                    m.bias.normal_(0, 0.1)
        ours = moevit.create_model(name).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        row = {}
        for h, w in [(256, 256), (224, 224), (250, 190), (64, 64)]:
            x = torch.randn(2, 3, h, w)
            with torch.no_grad():
                a = ref(x)
                b = ours(x)
                c = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
                ours.to(memory_format=torch.contiguous_format)
            row[f"{h}x{w}"] = {"max_abs_diff": float((a - b).abs().max()),
                               "channels_last_max_abs_diff": float((a - c).abs().max())}
        results[name] = row
        print(name, {k: v["max_abs_diff"] for k, v in row.items()})
    write_result(args.out, {"timm_version": timm.__version__, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
