"""Calibrated confidence and the blank filter, stored in a checkpoint's metadata.

Temperature scaling (Guo et al. 2017): one scalar T fitted on the ``val`` split by minimising the negative
log-likelihood of ``softmax(logits / T)``; the top-1 class never changes, only how sure the model says it is.
The expected calibration error (ECE, 15 equal-width confidence bins, weighted by the images in each) is reported
before and after, with a reliability diagram.

Blank filter: for a model with a ``blank`` class, an image is blank when its calibrated P(blank) is at least a
threshold chosen on ``val`` as the lowest one that keeps the chosen animal recall (an animal image is kept when its
P(blank) is under the threshold), so as many empty triggers as possible are filtered at that recall.

Both live in the checkpoint's metadata under ``moevit_calibration`` (JSON); the fingerprint (config and weights)
does not change. Every command that turns logits into probabilities reads them with :func:`read_calibration`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "META_KEY",
    "Calibration",
    "blank_threshold_for_recall",
    "collect_logits",
    "evaluate_calibration",
    "expected_calibration_error",
    "fit_temperature",
    "read_calibration",
    "reliability_diagram",
    "write_calibration",
]

META_KEY = "moevit_calibration"
ECE_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """How a checkpoint's logits become probabilities, and when an image is blank."""

    temperature: float = 1.0
    blank_class: int | None = None
    blank_threshold: float | None = None  # P(blank) >= this: blank; None: blank when the blank class is top-1
    fitted_on: str | None = None  # the data spec and split the values were chosen on
    report: dict[str, Any] = field(default_factory=dict)  # figures of the fit (ECE before/after, recall, ...)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() / self.temperature).softmax(dim=-1)

    def is_blank(self, probs: torch.Tensor) -> torch.Tensor:
        """Per row of ``probs``: whether the image is blank (all False without a blank class)."""
        if self.blank_class is None or self.blank_class >= probs.shape[-1]:
            return torch.zeros(probs.shape[:-1], dtype=torch.bool)
        p = probs[..., self.blank_class].double()
        if self.blank_threshold is None:
            return probs.argmax(dim=-1) == self.blank_class
        return p >= self.blank_threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "") -> Calibration:
        try:
            d = json.loads(text)
            t = float(d.get("temperature", 1.0))
            thr = d.get("blank_threshold")
            blank = d.get("blank_class")
            if not (math.isfinite(t) and t > 0) or (thr is not None and not 0 <= float(thr) <= 1):
                raise ValueError(f"temperature {t}, blank_threshold {thr}")
            return cls(t, None if blank is None else int(blank), None if thr is None else float(thr),
                       d.get("fitted_on"), dict(d.get("report") or {}))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: bad {META_KEY} metadata ({e}); re-run moe-calibrate") from None


def default_for(labels: Sequence[str]) -> Calibration:
    """No fit: T = 1 and, when a class is named blank, blank when it is top-1."""
    from moevit.kinds import BLANK, class_kinds

    blank = [i for i, k in class_kinds(labels).items() if k == BLANK]
    return Calibration(blank_class=blank[0] if blank else None)


def read_calibration(path: str | Path, labels: Sequence[str] | None = None) -> Calibration:
    """The calibration stored in checkpoint ``path`` (reads the metadata only), else :func:`default_for`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY in meta:
        return Calibration.from_json(meta[META_KEY], str(path))
    if labels is None:
        from moevit.checkpoint import read_config

        cfg = read_config(path)
        labels = list(cfg.labels) if cfg is not None else []
    return default_for(labels)


def write_calibration(path: str | Path, calibration: Calibration, out: str | Path | None = None) -> Path:
    """Store ``calibration`` in the metadata of checkpoint ``path`` (or a copy at ``out``), atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moevit.deploy.files import atomic_path

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    meta[META_KEY] = calibration.to_json()
    target = Path(out or path)
    with atomic_path(target, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


@torch.no_grad()
@torch.no_grad()
def collect_logits(model: Any, data: Any, batch_size: int = 64, *, drop_unreadable: bool = False,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every image of ``data`` (a dataset of (image, label)) under ``model`` (a callable).

    With ``drop_unreadable`` (a :class:`moevit.data.ImageDataset`) each image is decoded once and an unreadable one
    is left out (listed in ``data.skipped``) instead of replaced by the next readable one, so the result may be
    shorter than ``data``."""
    from tqdm import tqdm

    if hasattr(model, "eval"):
        model.eval()
    zs, ys = [], []
    for i in tqdm(range(0, len(data), batch_size), desc="eval", disable=not progress, leave=False):
        idx = range(i, min(i + batch_size, len(data)))
        items = data.readable(idx) if drop_unreadable else [data[j] for j in idx]
        if items:
            zs.append(torch.as_tensor(model(torch.stack([x for x, _ in items]))).float())
            ys.append(torch.tensor([int(y) for _, y in items]))
    if not zs:  # no image (or none readable)
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(zs), torch.cat(ys)


def evaluate_calibration(cal: Calibration, logits: torch.Tensor, labels: torch.Tensor,
                         kinds: dict[int, str] | None = None) -> dict[str, Any]:
    """ECE without and with ``cal``'s temperature, and the blank filter's animal recall and blanks filtered."""
    out: dict[str, Any] = {"temperature": cal.temperature, "fitted_on": cal.fitted_on,
                           "ece_before": round(expected_calibration_error(logits.softmax(-1), labels), 4),
                           "ece_after": round(expected_calibration_error(cal.probs(logits), labels), 4)}
    if cal.blank_class is not None:
        filtered = cal.is_blank(cal.probs(logits))
        animal = torch.tensor([int(y) not in (kinds or {cal.blank_class: "blank"}) for y in labels])
        blank = labels == cal.blank_class
        out.update(blank_threshold=cal.blank_threshold,
                   animal_recall=round(float((~filtered[animal]).float().mean()), 4) if animal.any() else None,
                   blanks_filtered=round(float(filtered[blank].float().mean()), 4) if blank.any() else None)
    return out


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of ``softmax(logits / T)`` (bounded search over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    z = logits.double()
    y = labels.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    best = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(best.x))


def _bins(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> list[tuple[int, float, float]]:
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).double()
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    c = conf.double().numpy()
    for i in range(bins):
        m = (c > edges[i]) & (c <= edges[i + 1]) if i else (c >= edges[0]) & (c <= edges[1])
        n = int(m.sum())
        out.append((n, float(c[m].mean()) if n else 0.0, float(correct.numpy()[m].mean()) if n else 0.0))
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (images in bin / all) * |accuracy - mean confidence|."""
    total = len(labels)
    return float(sum(n / total * abs(acc - conf) for n, conf, acc in _bins(probs, labels, bins))) if total else 0.0


def reliability_diagram(curves: dict[str, torch.Tensor], labels: torch.Tensor, path: str | Path,
                        bins: int = ECE_BINS, title: str = "") -> Path:
    """A PNG: accuracy against confidence per bin for each named set of probabilities (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name, probs in curves.items():
        pts = [(conf, acc) for n, conf, acc in _bins(probs, labels, bins) if n]
        ece = expected_calibration_error(probs, labels, bins)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def blank_threshold_for_recall(p_blank: torch.Tensor, is_animal: torch.Tensor, recall: float = 0.96) -> float:
    """The lowest threshold t with P(blank) < t for at least ``recall`` of the animal images (so the most blanks
    are filtered at that recall). Ties at the boundary stay kept: t sits just above the animal score it must keep."""
    scores = np.sort(p_blank[is_animal].double().numpy())
    if not len(scores):
        raise ValueError("no animal images to choose a blank threshold on")
    need = math.ceil(recall * len(scores) - 1e-9)  # animals that must be kept
    if need <= 0:
        return 0.0
    # the next float32 above the highest animal score kept: a float32 probability equal to it stays under
    kept_max = np.float32(scores[need - 1])
    return float(min(1.0, np.nextafter(kept_max, np.float32(np.inf))))
