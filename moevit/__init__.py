"""moevit: a per-patch mixture-of-experts MobileViTV2 for split inference on edge devices.

The network only: no grpc or ray imports below this package. The names below load lazily (PEP 562), so
importing a subpackage that needs no torch (``moevit.deploy``, ``moevit.partition``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelConfig": "moevit.config",
    "MoEConfig": "moevit.config",
    "MobileViTV2": "moevit.mobilevitv2",
    "build_model": "moevit.mobilevitv2",
    "create_model": "moevit.mobilevitv2",
    "list_models": "moevit.mobilevitv2",
}

__all__ = ["MobileViTV2", "ModelConfig", "MoEConfig", "build_model", "create_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moevit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
