"""moevit: a per-patch mixture-of-experts MobileViTV2 for split inference on edge devices.

The network only: no grpc or ray imports below this package.
"""

from moevit.config import ModelConfig, MoEConfig
from moevit.mobilevitv2 import MobileViTV2, build_model, create_model, list_models

__all__ = ["MobileViTV2", "ModelConfig", "MoEConfig", "build_model", "create_model", "list_models"]
__version__ = "0.1.0"
