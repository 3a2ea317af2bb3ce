"""The dataset layer: one spec string picks the images every command trains and evaluates on.

Specs (see :func:`parse_spec`):

* ``ssw60:PATH``: the iNaturalist part of SSW60 exactly as shipped (``images_inat/{asset_id}.jpg``,
  ``images_inat.csv``, ``taxa.csv``).
* ``folder:PATH``: any ImageFolder tree, one sub-folder per class.
* ``digits``: scikit-learn's bundled 8×8 digits (offline), upsampled and replicated to RGB.
* ``synthetic`` or ``synthetic:classes=4,per_class=20,seed=0,size=64``: seeded coloured stripes and blobs.
* ``scenes`` or ``scenes:classes=10,per_class=200,size=128,blank=0.5,seed=0,split_seed=0``: camera-trap-like
  scenes generated offline (:mod:`moevit.scenes`); its splits are drawn over bursts, and ``split_seed`` fixes them
  for every command whatever seed it is given.

Splits (see :func:`split_indices`), following the paper's protocol:

* ``train``: the training part minus a seeded ``eval_fraction`` (20 %) holdout.
* ``eval``: that holdout. Same seed → same split; ``train`` and ``eval`` are disjoint and cover the training part.
* ``test``: SSW60's own ``test`` rows. The other kinds have no official test split, so there ``test`` is the
  ``eval`` holdout (``describe()`` says so).
* ``search-train`` / ``val``: for hyperparameter search, ``train`` split again by a seeded ``val_fraction``
  (10 %); ``val`` never overlaps ``search-train`` or ``eval``.

Every dataset returns ``(image, label)``: a float32 ``[3, S, S]`` tensor normalised with the ImageNet mean/std and
an ``int``. Images are read lazily; an unreadable file is logged once, recorded in ``.skipped`` and replaced by the
next readable sample, so a corrupt file never stops a training loop. Commands that report per image use ``load``
(never a substitute) or ``verify(drop=True)`` first. Nothing here downloads anything, and
torchvision is never imported.
"""

from __future__ import annotations

import colorsys
import copy
import csv
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "SPLITS",
    "ArrayImageDataset",
    "Compose",
    "DataSpec",
    "FileImageDataset",
    "ImageDataset",
    "RandomHorizontalFlip",
    "Taxon",
    "UnreadableImageError",
    "denormalize",
    "find_unreadable",
    "make_loader",
    "normalize",
    "open_dataset",
    "parse_spec",
    "split_indices",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
KINDS = ("ssw60", "folder", "digits", "synthetic", "scenes")
SPLITS = ("train", "eval", "test", "search-train", "val")
TRAIN_SPLITS = ("train", "search-train")  # the only splits that get the training augmentation

SPEC_FORMS = ("ssw60:PATH, folder:PATH, digits, synthetic or synthetic:classes=N,per_class=N,seed=N,size=N, "
              "scenes or scenes:classes=N,per_class=N,size=N,blank=F,seed=N,split_seed=N")
SYNTHETIC_DEFAULTS = {"classes": 4, "per_class": 20, "seed": 0, "size": 64}
SYNTHETIC_MINIMA = {"classes": 2, "per_class": 1, "seed": 0, "size": 8}

SSW60_IMAGES_CSV = "images_inat.csv"
SSW60_TAXA_CSV = "taxa.csv"
SSW60_IMAGE_DIR = "images_inat"
SSW60_IMAGE_COLUMNS = ("asset_id", "label", "split")  # height, width, … are shipped too but not needed here
SSW60_TAXA_COLUMNS = ("label", "common_name", "scientific_name")
SSW60_SPLITS = ("train", "test")

Transform = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec. ``path`` is set for ssw60/folder; the int fields only mean something for synthetic."""

    kind: str
    path: Path | None = None
    classes: int = SYNTHETIC_DEFAULTS["classes"]
    per_class: int = SYNTHETIC_DEFAULTS["per_class"]
    seed: int = SYNTHETIC_DEFAULTS["seed"]
    size: int = SYNTHETIC_DEFAULTS["size"]
    scenes: Any = None  # a moevit.scenes.ScenesOptions for kind scenes

    def __str__(self) -> str:
        if self.kind == "scenes":
            return str(self.scenes)
        if self.kind in ("ssw60", "folder"):
            return f"{self.kind}:{self.path}"
        if self.kind == "synthetic":
            return f"synthetic:classes={self.classes},per_class={self.per_class},seed={self.seed},size={self.size}"
        return self.kind


def parse_spec(spec: str) -> DataSpec:
    """Parse ``kind[:argument]`` into a :class:`DataSpec`; raises ValueError naming the spec and the forms expected."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec {spec!r} is empty; expected one of: {SPEC_FORMS}")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"data spec {spec!r}: unknown kind {kind!r}; expected one of: {SPEC_FORMS}")
    if kind in ("ssw60", "folder"):
        if not arg.strip():
            raise ValueError(f"data spec {spec!r}: {kind} needs a directory, as in {kind}:PATH")
        return DataSpec(kind=kind, path=Path(arg.strip()).expanduser())
    if kind == "digits":
        if arg.strip():
            raise ValueError(f"data spec {spec!r}: digits takes no argument; write just 'digits'")
        return DataSpec(kind="digits")
    if kind == "scenes":
        from moevit.scenes import parse_options  # imported here: moevit.scenes imports this module

        return DataSpec(kind="scenes", scenes=parse_options(spec, arg))
    options = dict(SYNTHETIC_DEFAULTS)
    seen: set[str] = set()
    for item in arg.split(",") if arg.strip() else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"data spec {spec!r}: option {item!r} is not key=value; expected {SPEC_FORMS}")
        if key not in SYNTHETIC_DEFAULTS:
            raise ValueError(
                f"data spec {spec!r}: unknown synthetic option {key!r}; expected some of {sorted(SYNTHETIC_DEFAULTS)}"
            )
        if key in seen:
            raise ValueError(f"data spec {spec!r}: synthetic option {key!r} given twice")
        seen.add(key)
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"data spec {spec!r}: synthetic option {key}={value!r} is not an integer") from None
        if number < SYNTHETIC_MINIMA[key]:
            raise ValueError(f"data spec {spec!r}: synthetic option {key} must be >= {SYNTHETIC_MINIMA[key]}")
        options[key] = number
    return DataSpec(kind="synthetic", **options)


# ---------------------------------------------------------------------------------------------------------- splits


def _share(n: int, fraction: float) -> int:
    """round(n·fraction), clipped to [1, n-1] so that neither side of a split is ever empty."""
    return min(max(int(math.floor(n * fraction + 0.5)), 1), n - 1)


def split_indices(n: int, *, seed: int, eval_fraction: float = 0.2, val_fraction: float = 0.1) -> dict[str, list[int]]:
    """Seeded, disjoint index sets into a training part of ``n`` items: train, eval, search-train, val (all sorted).

    eval is a random ``eval_fraction`` of all n and train the rest; val is a random ``val_fraction`` of train and
    search-train the rest. val is drawn from its own stream, so changing val_fraction never moves train/eval.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 3:
        raise ValueError(f"cannot hold out eval and val images from a training part of {n} image(s); need >= 3")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = _share(n, eval_fraction)
    eval_idx, train_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    perm_val = np.random.default_rng([seed, 1]).permutation(len(train_idx))
    n_val = _share(len(train_idx), val_fraction)
    val_idx, search_idx = np.sort(train_idx[perm_val[:n_val]]), np.sort(train_idx[perm_val[n_val:]])
    return {
        "train": train_idx.tolist(),
        "eval": eval_idx.tolist(),
        "search-train": search_idx.tolist(),
        "val": val_idx.tolist(),
    }


# ---------------------------------------------------------------------------------------------- tensors, transforms


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[3, H, W] (or [N, 3, H, W]) in [0, 1] → ImageNet-normalised."""
    return (x - _MEAN) / _STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, for saving or showing images."""
    return x * _STD + _MEAN


class RandomHorizontalFlip:
    """Flip a [C, H, W] tensor left-right with probability p.

    Draws from ``generator`` if given, else torch's global RNG (which a DataLoader seeds per worker).
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand((), generator=self.generator).item() < self.p:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply tensor transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode (corrupt, truncated, missing, not an image)."""


# Largest image decoded by default: 50 megapixels admits the 48 MP images many trail cameras write by
# interpolation (8000x6000) and the 12-24 MP sensors they have. A file of a few bytes can declare billions of
# pixels ("decompression bomb"); it is refused from its header, before decoding. moe-coordinator
# --max-megapixels moves the limit, up to MAX_IMAGE_PIXELS_CEILING (decoding costs ~3 bytes and a little CPU
# per pixel: 100 MP is ~300 MB of RGB).
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_PIXELS_CEILING = 100_000_000


# A progressive JPEG is decoded once per scan: a 114 KB file of 6000x6000 pixels with 4,000 empty scans took 15 s.
# Encoders write about 10 scans (libjpeg's default progression); more than this many, or more scan-pixels than
# MAX_SCAN_PIXELS (16 full passes over a 40-megapixel image), is refused from the bytes before decoding.
MAX_JPEG_SCANS = 64
MAX_SCAN_PIXELS = 16 * 40_000_000

# Modes whose samples are wider than 8 bits (16-bit grey PNG/TIFF: I;16*, 32-bit integer: I, float: F).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _check_scans(source: Any, pixels: int) -> None:
    """Refuse a progressive JPEG with too many scans (counted as start-of-scan markers, which entropy-coded data
    cannot contain: a 0xFF byte there is always followed by 0x00 or a restart marker)."""
    data = source.getvalue() if hasattr(source, "getvalue") else Path(source).read_bytes()
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS or scans * pixels > MAX_SCAN_PIXELS:
        raise UnreadableImageError(f"a progressive JPEG of {scans} scans over {pixels:,} pixels: more decoding work "
                                   f"than the limit of {MAX_JPEG_SCANS} scans and {MAX_SCAN_PIXELS:,} scan-pixels")


def _read_wide(im: Image.Image, image_size: int) -> torch.Tensor:
    """An image of 16/32-bit integer or float samples as float32 [3, S, S] in [0, 1]: 16-bit samples over 65535,
    32-bit integers over 65535 when they fit in 16 bits (how 16-bit files often load) else over their range, floats
    as they are when within [0, 1] else over their range; one grey channel repeated as RGB."""
    array = np.asarray(im, dtype=np.float32)  # forces the full decode
    if array.ndim != 2:
        raise UnreadableImageError(f"mode {im.mode} image of shape {list(array.shape)}: expected one channel")
    array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        array = array / 65535.0
    elif not (im.mode == "F" and lo >= 0 and hi <= 1):
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    grey = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0).copy())
    return x.expand(3, -1, -1).contiguous()


def _read_image(path: Path, image_size: int, max_pixels: int | None = None) -> torch.Tensor:
    """Decode ``path`` to RGB, resize bilinearly to image_size², return float32 [3, S, S] in [0, 1]."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limit:
                raise UnreadableImageError(f"the image declares {w}x{h} pixels, more than the "
                                           f"{limit:,}-pixel limit (moe-coordinator --max-megapixels)")
            if im.format == "JPEG" and (im.info.get("progressive") or im.info.get("progression")):
                _check_scans(path, w * h)
            if im.mode in WIDE_MODES:  # 16/32-bit integer or float samples: scaled, not clipped to 8 bits
                return _read_wide(im, image_size)
            rgb = im.convert("RGB")  # convert() forces the full decode, so truncation surfaces here
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    except UnreadableImageError:
        raise
    except Exception as err:  # any failure to decode an untrusted file makes it unusable, whatever PIL raised
        raise UnreadableImageError(f"{type(err).__name__}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(source: str | Path | bytes, image_size: int, max_pixels: int | None = None) -> torch.Tensor:
    """One image (a file path or its encoded bytes) as the model's input: normalised float32 [3, S, S].

    Raises :class:`UnreadableImageError` naming the problem when it cannot be decoded or declares more than
    ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        return normalize(_read_image(io.BytesIO(bytes(source)), image_size, max_pixels))  # type: ignore[arg-type]
    return normalize(_read_image(Path(source), image_size, max_pixels))


def find_unreadable(paths: Iterable[str | Path], image_size: int = 8) -> list[tuple[str, str]]:
    """Try to decode every file; return ``(path, reason)`` for each that fails. Logs nothing."""
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            _read_image(Path(path), image_size)
        except UnreadableImageError as err:
            bad.append((str(path), str(err)))
    return bad


# -------------------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Taxon:
    """One SSW60 class as ``taxa.csv`` describes it; ``label`` is the file's own label value."""

    index: int
    label: str
    common_name: str
    scientific_name: str


class ImageDataset(Dataset):
    """Base of every dataset here: labelled items of one split, loaded lazily and normalised.

    Subclasses implement ``_load(item)`` (float32 [3, S, S] in [0, 1], raising UnreadableImageError) and
    ``_source(item)`` (a path or name for messages). Attributes: ``classes`` (names, index = label), ``targets``,
    ``taxa`` (list of :class:`Taxon` or None), ``skipped`` (``(path, reason)`` of unreadable items met so far,
    in this process: with DataLoader workers call :meth:`verify` in the main process for a complete list).
    """

    def __init__(
        self,
        *,
        items: Sequence[Any],
        targets: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        spec: DataSpec,
        split: str,
        origin: str,
        transform: Transform | None = None,
        taxa: Sequence[Taxon] | None = None,
    ) -> None:
        if len(items) != len(targets):
            raise ValueError(f"{len(items)} items but {len(targets)} targets")
        self.items: list[Any] = list(items)
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.image_size = image_size
        self.spec = spec
        self.split = split
        self.origin = origin
        self.transform = transform
        self.taxa: list[Taxon] | None = list(taxa) if taxa is not None else None
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()

    def _load(self, item: Any) -> torch.Tensor:
        raise NotImplementedError

    def _source(self, item: Any) -> str:
        return f"{self.spec.kind}[{item}]"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        # An unreadable item is replaced by the next readable one (wrapping), so the result is deterministic.
        for step in range(n):
            got = self.readable([(index + step) % n])
            if got:
                return got[0]
        raise RuntimeError(f"{self.describe()}: no readable image left ({len(self.skipped)} unreadable)")

    def readable(self, indices: Iterable[int]) -> list[tuple[torch.Tensor, int]]:
        """Items ``indices`` decoded once each, as ``self[i]`` gives them; an unreadable one is left out, never
        replaced by another image, and listed in ``skipped`` (logged once). For one-pass evaluations (moe-eval)."""
        out = []
        for i in indices:
            if i in self._bad:
                continue
            try:
                x = self._load(self.items[i])
            except UnreadableImageError as err:
                self._mark_bad(i, str(err))
                continue
            x = normalize(x)
            if self.transform is not None:
                x = self.transform(x)
            out.append((x, self.targets[i]))
        return out

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` itself, never a substitute: raises :class:`UnreadableImageError` naming the file.

        For commands that report per item (``moe-coordinator --data``): a result must belong to its own image.
        """
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        try:
            x = self._load(self.items[index])
        except UnreadableImageError as err:
            raise UnreadableImageError(f"{self._source(self.items[index])}: {err}") from err
        x = normalize(x)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def _mark_bad(self, i: int, reason: str) -> None:
        self._bad.add(i)
        source = self._source(self.items[i])
        self.skipped.append((source, reason))
        logger.warning("skipping unreadable image %s (%s)", source, reason)

    def verify(self, drop: bool = False) -> list[tuple[str, str]]:
        """Decode every item now; return ``(path, reason)`` for the unreadable ones (each also logged once).

        With ``drop=True`` they are removed, so ``len`` and ``targets`` count only readable images afterwards.
        """
        for i, item in enumerate(self.items):
            if i in self._bad:
                continue
            try:
                self._load(item)
            except UnreadableImageError as err:
                self._mark_bad(i, str(err))
        bad_sources = {self._source(self.items[i]) for i in self._bad}
        found = [entry for entry in self.skipped if entry[0] in bad_sources]
        if drop and self._bad:
            keep = [i for i in range(len(self.items)) if i not in self._bad]
            self.items = [self.items[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            self._bad = set()
        return found

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_classes(self, num_classes: int, model: str) -> None:
        """Refuse a data set whose class count is not the model's: its labels would index the wrong classes."""
        if len(self.classes) != num_classes:
            raise ValueError(f"{model} has {num_classes} classes but {self.spec} has {len(self.classes)}: the class "
                             "counts differ, so labels would not match; use the data set the model was trained on")

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for t in self.targets:
            counts[t] += 1
        return counts

    def class_info(self) -> list[dict[str, Any]]:
        """One dict per class (index, name, and the taxon's fields where known), for output files."""
        info: list[dict[str, Any]] = []
        for i, name in enumerate(self.classes):
            row: dict[str, Any] = {"index": i, "name": name}
            if self.taxa is not None:
                taxon = self.taxa[i]
                row.update(label=taxon.label, common_name=taxon.common_name, scientific_name=taxon.scientific_name)
            info.append(row)
        return info

    def subset(self, fraction: float, *, seed: int) -> ImageDataset:
        """A seeded share of this split, drawn per class (round(fraction * n) images of a class of n, at least one),
        in the split's order: the paper's data-subset ablation. ``fraction`` 1 returns the split itself."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"a data fraction must be in (0, 1], got {fraction}")
        if fraction == 1.0:
            return self
        rng = np.random.default_rng(seed)
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(self.targets):
            by_class.setdefault(t, []).append(i)
        keep = sorted(i for members in by_class.values()
                      for i in rng.permutation(members)[:max(1, math.floor(fraction * len(members) + 0.5))].tolist())
        part = copy.copy(self)  # the subclass's own fields (images, scene) are shared, read only
        part.items, part.targets = [self.items[i] for i in keep], [self.targets[i] for i in keep]
        part.skipped, part._bad = [], set()  # positions changed: what was met unreadable is met again
        part.origin = f"{self.origin}; a seeded {fraction:g} of each class (seed {seed})"
        return part

    def describe(self) -> str:
        s = self.image_size
        text = f"{self.spec} [{self.split}]: {len(self)} images, {len(self.classes)} classes, {s}x{s} px; {self.origin}"
        if self.skipped:
            text += f"; {len(self.skipped)} unreadable skipped"
        return text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class FileImageDataset(ImageDataset):
    """Items are image paths, decoded with PIL on access."""

    def _load(self, item: Path) -> torch.Tensor:
        return _read_image(item, self.image_size)

    def _source(self, item: Path) -> str:
        return str(item)

    @property
    def paths(self) -> list[Path]:
        return list(self.items)


class ArrayImageDataset(ImageDataset):
    """Items are row indices into an in-memory float32 array [N, C, h, w] in [0, 1], C = 1 or 3.

    Rows are resized on access (bilinear), not up front: 1797 digits at 256² would otherwise take 1.4 GB.
    """

    def __init__(self, *, images: np.ndarray, **kwargs: Any) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, 1|3, h, w], got shape {images.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        super().__init__(**kwargs)

    def _load(self, item: int) -> torch.Tensor:
        x = torch.from_numpy(self.images[item])
        s = self.image_size
        if x.shape[-2:] != (s, s):
            shrink = x.shape[-1] > s or x.shape[-2] > s
            x = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)[0]
        return x.expand(3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------------------- readers


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})")
        reader.fieldnames = header
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _label_key(label: str) -> str:
    """Labels are compared as text, but '07' and '7' mean the same integer label."""
    return str(int(label)) if label.lstrip("-").isdigit() else label


def _read_ssw60(root: Path) -> tuple[list[Taxon], list[tuple[Path, int, str]]]:
    """Read and check SSW60's iNat CSVs; return the taxa and (path, class index, csv split) per image row."""
    if not root.is_dir():
        raise ValueError(f"SSW60 root {root} is not a directory")
    image_dir = root / SSW60_IMAGE_DIR
    if not image_dir.is_dir():
        raise ValueError(f"SSW60 root {root}: no {SSW60_IMAGE_DIR}/ directory")
    taxa_csv, images_csv = root / SSW60_TAXA_CSV, root / SSW60_IMAGES_CSV
    taxa_rows = _read_csv(taxa_csv, SSW60_TAXA_COLUMNS)
    if not taxa_rows:
        raise ValueError(f"{taxa_csv}: no taxa")
    keys = [_label_key(r["label"]) for r in taxa_rows]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"{taxa_csv}: label(s) {', '.join(duplicates)} appear more than once")
    # Class index = position in taxa.csv sorted by label (numerically when every label is an integer).
    numeric = all(k.lstrip("-").isdigit() for k in keys)
    order = sorted(range(len(taxa_rows)), key=lambda i: int(keys[i]) if numeric else keys[i])
    taxa = [
        Taxon(
            index=j,
            label=taxa_rows[i]["label"],
            common_name=taxa_rows[i]["common_name"],
            scientific_name=taxa_rows[i]["scientific_name"],
        )
        for j, i in enumerate(order)
    ]
    index_of = {_label_key(t.label): t.index for t in taxa}

    records: list[tuple[Path, int, str]] = []
    for line, row in enumerate(_read_csv(images_csv, SSW60_IMAGE_COLUMNS), start=2):  # line 1 is the header
        label, split, asset = row["label"], row["split"].lower(), row["asset_id"]
        if _label_key(label) not in index_of:
            raise ValueError(f"{images_csv} line {line}: label {label!r} is not in {taxa_csv}")
        if split not in SSW60_SPLITS:
            raise ValueError(f"{images_csv} line {line}: split {row['split']!r} is not one of {SSW60_SPLITS}")
        if not asset:
            raise ValueError(f"{images_csv} line {line}: empty asset_id")
        name = asset if Path(asset).suffix.lower() in IMAGE_EXTENSIONS else f"{asset}.jpg"
        records.append((image_dir / name, index_of[_label_key(label)], split))
    # Sorted by path, so the seeded holdout does not depend on the CSV's row order.
    records.sort(key=lambda r: r[0].name)
    return taxa, records


def _read_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes = sorted sub-folder names; images found recursively under each by extension."""
    if not root.is_dir():
        raise ValueError(f"image folder {root} is not a directory")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class sub-folders; expected {root}/CLASS/IMAGE.jpg")
    samples: list[tuple[Path, int]] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            # dot-files are skipped: macOS '._x.jpg' sidecars carry an image suffix but are not images
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((p, index) for p in files)
    return [d.name for d in class_dirs], samples


def _digits() -> tuple[np.ndarray, list[int]]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: read from disk, never downloaded

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    return images, bunch.target.astype(int).tolist()


def _synthetic(spec: DataSpec) -> tuple[np.ndarray, list[int]]:
    """Per class: its own hue and stripe angle, plus a blob of that hue at a random place and pixel noise.

    Within a class the stripe phase/period, blob position/radius and noise vary, so it is learnable, not trivial.
    """
    rng = np.random.default_rng(spec.seed)
    n_cls, size = spec.classes, spec.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n_cls * spec.per_class, 3, size, size), dtype=np.float32)
    targets: list[int] = []
    for c in range(n_cls):
        hue = c / n_cls
        fg = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95), dtype=np.float32)[:, None, None]
        bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.35, 0.3), dtype=np.float32)[:, None, None]
        angle = math.pi * c / n_cls
        along = xx * math.cos(angle) + yy * math.sin(angle)
        for _ in range(spec.per_class):
            period = rng.uniform(0.15, 0.3)
            stripes = (np.sin(2 * math.pi * (along / period + rng.uniform())) > 0).astype(np.float32)
            cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.2)
            blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2).astype(np.float32)
            mask = np.maximum(0.6 * stripes, blob)
            image = bg * (1 - mask) + fg * mask + rng.normal(0.0, 0.06, size=(3, size, size)).astype(np.float32)
            images[len(targets)] = np.clip(image, 0.0, 1.0)
            targets.append(c)
    return images, targets


# ------------------------------------------------------------------------------------------------------------ open


def open_dataset(
    spec: str | DataSpec,
    *,
    image_size: int,
    split: str,
    seed: int = 0,
    eval_fraction: float = 0.2,
    val_fraction: float = 0.1,
    train_transform: Transform | None = None,
    flip: bool = False,
) -> ImageDataset:
    """Open one split of the dataset ``spec`` names, checking its files now (before any training starts).

    split: one of :data:`SPLITS` (see the module docstring). seed picks the holdouts (for synthetic it is separate
    from the spec's own generator ``seed``). ``flip`` (p = 0.5) and then ``train_transform`` are applied to the
    normalised tensor on the training splits ``train`` and ``search-train`` only, and ignored on the others, so
    evaluation stays deterministic.
    """
    data_spec = parse_spec(spec) if isinstance(spec, str) else spec
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    transforms: list[Transform] = []
    if split in TRAIN_SPLITS:
        if flip:
            transforms.append(RandomHorizontalFlip(0.5))
        if train_transform is not None:
            transforms.append(train_transform)
    transform = None if not transforms else transforms[0] if len(transforms) == 1 else Compose(transforms)

    if data_spec.kind == "scenes":
        from moevit.scenes import open_scenes

        return open_scenes(data_spec.scenes, data_spec, image_size=image_size, split=split, seed=seed,
                           eval_fraction=eval_fraction, val_fraction=val_fraction, transform=transform)
    taxa: list[Taxon] | None = None
    test_items: list[Any] = []
    test_targets: list[int] = []
    images: np.ndarray | None = None
    if data_spec.kind == "ssw60":
        assert data_spec.path is not None
        taxa, records = _read_ssw60(data_spec.path)
        classes = [t.common_name or t.scientific_name or t.label for t in taxa]
        items: list[Any] = [p for p, _, s in records if s == "train"]
        targets = [t for _, t, s in records if s == "train"]
        test_items = [p for p, _, s in records if s == "test"]
        test_targets = [t for _, t, s in records if s == "test"]
    elif data_spec.kind == "folder":
        assert data_spec.path is not None
        classes, samples = _read_folder(data_spec.path)
        items, targets = [p for p, _ in samples], [t for _, t in samples]
    elif data_spec.kind == "digits":
        images, targets = _digits()
        classes, items = [str(d) for d in range(10)], list(range(len(targets)))
    elif data_spec.kind == "synthetic":
        images, targets = _synthetic(data_spec)
        classes, items = [f"class{c}" for c in range(data_spec.classes)], list(range(len(targets)))
    else:  # a hand-built DataSpec can carry any string
        raise ValueError(f"data spec {str(data_spec)!r}: unknown kind {data_spec.kind!r}; expected: {SPEC_FORMS}")

    n = len(items)
    if data_spec.kind == "ssw60" and split == "test":
        chosen, origin = list(range(len(test_items))), "SSW60's own iNat test split"
        items, targets = test_items, test_targets
    else:
        parts = split_indices(n, seed=seed, eval_fraction=eval_fraction, val_fraction=val_fraction)
        key = "eval" if split == "test" else split
        chosen = parts[key]
        pct_eval, pct_val = round(100 * eval_fraction), round(100 * val_fraction)
        origin = {
            "train": f"the {100 - pct_eval}% left after a seeded {pct_eval}% eval holdout",
            "eval": f"a seeded {pct_eval}% eval holdout",
            "search-train": f"the train split minus a seeded {pct_val}% val holdout",
            "val": f"a seeded {pct_val}% val holdout of the train split",
        }[key]
        origin += f" (seed {seed}) of {n} training images"
        if split == "test":
            origin = f"no official test split, so test = eval: {origin}"
    common: dict[str, Any] = dict(
        items=[items[i] for i in chosen],
        targets=[targets[i] for i in chosen],
        classes=classes,
        image_size=image_size,
        spec=data_spec,
        split=split,
        origin=origin,
        transform=transform,
        taxa=taxa,
    )
    if images is not None:
        return ArrayImageDataset(images=images, **common)
    return FileImageDataset(**common)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling (and per-worker torch seeds) come from a generator seeded with ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
    )
