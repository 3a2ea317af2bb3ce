"""Checkpoints: safetensors weights with the model config as JSON in the file's metadata.

A moevit file rebuilds its model from the file alone. A timm safetensors file (no moevit metadata) loads into a
model of the same architecture. Pickle files are refused unless torch can read them with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moevit.checkpoint_meta import read_metadata
from moevit.config import ModelConfig
from moevit.deploy.files import atomic_path
from moevit.mobilevitv2 import MobileViTV2, build_model

FORMAT = "moevit/1"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def fingerprint(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> str:
    """Hash of config and weights: coordinator and workers compare it to be sure they serve one model."""
    h = hashlib.sha256(config.to_json().encode())
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: MobileViTV2) -> str:
    return fingerprint(model.config, model.state_dict())


def save_checkpoint(model: MobileViTV2, path: str | Path, *, extra: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` to ``path`` (safetensors); returns the path. ``extra`` adds string metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_json(), "fingerprint": fingerprint(model.config, state)}
    meta.update(extra or {})
    with atomic_path(path) as tmp:  # a crash mid-write never leaves a half file under the real name
        save_file(state, str(tmp), metadata=meta)
    return path


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a weights file, with clear errors for missing, truncated or pickle files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return _read_pickle_weights(path), {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return state, meta


def _read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError depending on the content
        raise CheckpointError(
            f"{path}: refused: a pickle checkpoint that does not load with weights_only=True can run code; "
            f"convert it to safetensors ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(obj)


def read_config(path: str | Path) -> ModelConfig | None:
    """The moevit config stored in a file's metadata, or ``None`` for a plain (e.g. timm) weights file; only the
    header is read (no tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return None
    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return _config_from_meta(path, meta)


def _config_from_meta(path: Path, meta: Mapping[str, str]) -> ModelConfig | None:
    if "config" not in meta:
        return None
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model config in metadata: {e}") from None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> MobileViTV2:
    """Rebuild a moevit model from its file alone (eval mode)."""
    path = Path(path)
    state, meta = read_file(path)
    config = _config_from_meta(path, meta)
    if config is None:
        raise CheckpointError(f"{path}: no moevit config in its metadata; for timm weights create the model with "
                              "moevit.create_model(...) and call load_weights(model, path)")
    try:
        model = build_model(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _load_strict(model, state, path)
    if verify and "fingerprint" in meta and fingerprint(config, state) != meta["fingerprint"]:
        raise CheckpointError(f"{path}: weights do not match the fingerprint stored in the file (corrupt?)")
    return model.eval()


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {shapes[:2]})")
        raise CheckpointError(f"{path}: does not fit {getattr(model, 'config', None) and model.config.arch}: "
                              + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_weights(model: MobileViTV2, path: str | Path, *, new_head: bool = False) -> list[str]:
    """Load a timm or moevit weights file into ``model``.

    With ``new_head`` the classifier is left as initialised when its shape differs (fine-tuning on new classes);
    returns the keys that were not loaded. Any other mismatch is an error naming the file.
    """
    path = Path(path)
    state, _ = read_file(path)
    own = model.state_dict()
    skipped: list[str] = []
    if new_head:
        for k in ("head.fc.weight", "head.fc.bias"):
            if k in state and k in own and state[k].shape != own[k].shape:
                state.pop(k)
                skipped.append(k)
        state = {**{k: own[k] for k in skipped}, **state}
    _load_strict(model, state, path)
    return skipped
