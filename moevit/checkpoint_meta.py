"""A checkpoint's metadata (config, fingerprint) from its safetensors header alone: no tensors read, no torch.

The partitioner, the simulator and the coordinator's checks need only these strings; reading them must not load
(or even import) the model. :mod:`moevit.checkpoint` reads and writes the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["checkpoint_fingerprint", "read_metadata"]

# safetensors caps its own header at 100 MB; a bigger length field is not a safetensors file
MAX_HEADER_BYTES = 100 << 20


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none); ValueError naming the file
    when it is not a safetensors file, OSError when it cannot be read."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors checkpoint (bad header)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors checkpoint (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def checkpoint_fingerprint(path: str | Path) -> str:
    """The model fingerprint of a moevit checkpoint: from the header's metadata when stored there (no tensors
    read, no torch), else by loading the model."""
    fp = read_metadata(path).get("fingerprint")
    if fp:
        return fp
    from moevit.checkpoint import load_checkpoint, model_fingerprint

    return model_fingerprint(load_checkpoint(path))
