"""Camera-trap-like scenes, generated offline and deterministically: the benchmark where the MoE layers must matter.

Each image is one frame of a *burst* (3-5 frames, the animal moving a little between them) of a static camera:

* an animal of one of several confusable species, drawn procedurally (body, neck, head, snout, ears, four legs,
  tail, coat pattern, belly), its shape and colours set by the species, varied per individual (size, proportions,
  hue) and per frame (gait phase, head pose, position); 8-40 % of the frame by bounding box, anywhere, facing
  left or right, partly hidden behind foreground grass, branches or a rock, sometimes partly out of frame;
* on a background that is a crop of one of scikit-learn's two bundled photographs (``load_sample_images``), a
  procedural ground texture (fractal noise in soil, sand, leaf-litter or grass colours) with vegetation, or a
  photograph above a ground band;
* by day (colour, varying light) or by infra-red night flash (grey, bright centre, noisy, eye-shine);
* or no animal at all: the ``blank`` class (empty triggers are about half of what real traps record).

The named species come in confusable pairs (fox/jackal, genet/civet, hare/rabbit, muntjac/duiker, badger/honey
badger, mongoose/wildcat ...) that differ in one or two traits, and at night colour is gone. ``zoo=N`` (N >= 1)
draws species at random from the same trait space instead (seeded by N): the pretraining corpus uses such species,
never the named ones.

``morphs=1`` makes the pairs polymorphic and crosses them (classes 0 and 1, 2 and 3, ...): species A of a pair comes
as (A's shape, A's coat) or (B's shape, B's coat), species B as (A's shape, B's coat) or (B's shape, A's coat), each
burst one morph at even odds. Neither shape nor coat alone tells A from B, only the two together (an XOR, which a
linear read-out of separate shape and coat features cannot compute): the network has to combine the body's shape
with its coat once it has seen the whole animal, in its later layers (a harder benchmark aimed at issue 17's gate).

Everything is a pure function of (seed, class, burst, frame), so one frame can be rendered alone (``lazy``
datasets render on access) and the same spec always gives the same pixels. Nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from moevit.data import ImageDataset, split_indices

__all__ = [
    "BLANK",
    "SHAPE_TRAITS",
    "SPECIES",
    "Frame",
    "SceneSpec",
    "Species",
    "burst_layout",
    "class_names",
    "crossed",
    "generate",
    "morph_of",
    "render",
    "species_for",
]

BLANK = "blank"
MIN_BURST, MAX_BURST = 3, 5
AREA_RANGE = (0.08, 0.40)  # animal bounding box / frame area
START_TIME = datetime(2024, 5, 1, 0, 0, 0)


@dataclass(frozen=True)
class Species:
    """Traits of one species. Lengths are relative (body length 1); colours are HSV in [0, 1]."""

    name: str
    body_h: float = 0.45  # body height / body length
    head: float = 0.22  # head radius / body length
    snout: float = 0.8  # snout length / head radius
    neck: float = 0.5  # how high the head sits above the back, in body heights
    ears: str = "pointed"  # pointed | round | long | none
    ear_size: float = 1.0
    legs: float = 0.8  # leg length / body height
    leg_w: float = 0.22  # leg width / body height
    tail: str = "thin"  # thin | bushy | short | curled | ringed
    tail_len: float = 0.6  # / body length
    pattern: str = "plain"  # plain | spots | stripes | saddle | dorsal | rosettes
    pattern_scale: float = 1.0
    base: tuple[float, float, float] = (0.08, 0.6, 0.7)
    accent: tuple[float, float, float] = (0.08, 0.6, 0.25)
    belly: float = 0.0  # 0: none, 1: a light belly
    tail_tip: float = 0.0  # 0: none, 1: a light tail tip


# Confusable pairs: each pair shares most traits; at night (no colour) some pairs differ only in shape or pattern.
SPECIES: tuple[Species, ...] = (
    Species("red_fox", body_h=0.42, head=0.21, snout=1.0, ears="pointed", ear_size=1.1, legs=0.75, tail="bushy",
            tail_len=0.75, base=(0.06, 0.8, 0.85), accent=(0.06, 0.5, 0.2), belly=1.0, tail_tip=1.0),
    Species("jackal", body_h=0.45, head=0.2, snout=1.1, ears="pointed", ear_size=1.25, legs=0.95, tail="bushy",
            tail_len=0.55, pattern="saddle", base=(0.09, 0.45, 0.7), accent=(0.08, 0.3, 0.2), belly=1.0),
    Species("genet", body_h=0.32, head=0.17, snout=0.9, neck=0.25, ears="round", ear_size=1.1, legs=0.6,
            tail="ringed", tail_len=1.0, pattern="spots", base=(0.12, 0.2, 0.75), accent=(0.1, 0.4, 0.12)),
    Species("civet", body_h=0.38, head=0.18, snout=0.9, neck=0.25, ears="round", ear_size=0.9, legs=0.65,
            tail="ringed", tail_len=0.7, pattern="stripes", base=(0.12, 0.25, 0.6), accent=(0.1, 0.3, 0.1)),
    Species("hare", body_h=0.55, head=0.2, snout=0.5, neck=0.35, ears="long", ear_size=1.3, legs=0.7,
            tail="short", tail_len=0.15, base=(0.08, 0.5, 0.55), accent=(0.08, 0.4, 0.2), belly=1.0),
    Species("rabbit", body_h=0.62, head=0.22, snout=0.4, neck=0.25, ears="long", ear_size=0.9, legs=0.45,
            tail="short", tail_len=0.12, base=(0.07, 0.25, 0.5), accent=(0.07, 0.2, 0.3), tail_tip=1.0),
    Species("muntjac", body_h=0.5, head=0.17, snout=1.0, neck=0.9, ears="pointed", ear_size=0.8, legs=1.3,
            leg_w=0.16, tail="short", tail_len=0.15, base=(0.05, 0.65, 0.6), accent=(0.05, 0.5, 0.3), belly=1.0),
    Species("duiker", body_h=0.52, head=0.16, snout=1.0, neck=0.7, ears="round", ear_size=0.9, legs=1.15,
            leg_w=0.16, tail="short", tail_len=0.12, pattern="dorsal", base=(0.07, 0.55, 0.45),
            accent=(0.05, 0.5, 0.15)),
    Species("badger", body_h=0.5, head=0.2, snout=0.8, neck=0.0, ears="none", legs=0.4, leg_w=0.3, tail="short",
            tail_len=0.12, pattern="dorsal", pattern_scale=1.6, base=(0.0, 0.0, 0.45), accent=(0.0, 0.0, 0.95)),
    Species("honey_badger", body_h=0.48, head=0.19, snout=0.7, neck=0.0, ears="none", legs=0.45, leg_w=0.3,
            tail="short", tail_len=0.18, pattern="saddle", pattern_scale=1.4, base=(0.0, 0.0, 0.12),
            accent=(0.0, 0.0, 0.85)),
    Species("mongoose", body_h=0.3, head=0.16, snout=0.9, neck=0.2, ears="round", ear_size=0.6, legs=0.55,
            tail="thin", tail_len=0.8, base=(0.1, 0.3, 0.5), accent=(0.1, 0.3, 0.3)),
    Species("wildcat", body_h=0.4, head=0.2, snout=0.35, neck=0.35, ears="pointed", ear_size=0.9, legs=0.75,
            tail="ringed", tail_len=0.65, pattern="stripes", pattern_scale=0.8, base=(0.1, 0.2, 0.55),
            accent=(0.1, 0.3, 0.15)),
    Species("serval", body_h=0.45, head=0.18, snout=0.35, neck=0.5, ears="round", ear_size=1.5, legs=1.1,
            tail="short", tail_len=0.3, pattern="spots", pattern_scale=1.3, base=(0.11, 0.6, 0.8),
            accent=(0.1, 0.5, 0.1)),
    Species("squirrel", body_h=0.45, head=0.22, snout=0.45, neck=0.3, ears="round", ear_size=0.8, legs=0.5,
            tail="curled", tail_len=0.9, base=(0.05, 0.55, 0.5), accent=(0.05, 0.4, 0.2), belly=1.0),
)

_EARS = ("pointed", "round", "long", "none")
_TAILS = ("thin", "bushy", "short", "curled", "ringed")
_PATTERNS = ("plain", "spots", "stripes", "saddle", "dorsal", "rosettes")


def random_species(zoo: int, index: int) -> Species:
    """A species drawn from the trait space, seeded by (zoo, index): the pretraining corpus's classes."""
    r = np.random.default_rng([zoo, index, 7919])
    hue = float(r.uniform(0.0, 0.16)) if r.random() < 0.85 else float(r.uniform(0, 1))
    return Species(
        name=f"zoo{zoo}_{index:03d}", body_h=float(r.uniform(0.28, 0.65)), head=float(r.uniform(0.14, 0.25)),
        snout=float(r.uniform(0.3, 1.2)), neck=float(r.uniform(0.0, 1.0)), ears=str(r.choice(_EARS)),
        ear_size=float(r.uniform(0.6, 1.5)), legs=float(r.uniform(0.4, 1.3)), leg_w=float(r.uniform(0.14, 0.32)),
        tail=str(r.choice(_TAILS)), tail_len=float(r.uniform(0.1, 1.0)), pattern=str(r.choice(_PATTERNS)),
        pattern_scale=float(r.uniform(0.7, 1.6)), base=(hue, float(r.uniform(0.0, 0.8)), float(r.uniform(0.15, 0.9))),
        accent=(hue, float(r.uniform(0.0, 0.6)), float(r.choice([r.uniform(0.05, 0.3), r.uniform(0.8, 0.95)]))),
        belly=float(r.random() < 0.4), tail_tip=float(r.random() < 0.25),
    )


@dataclass(frozen=True)
class SceneSpec:
    """What to generate. ``blank`` is the share of all images that are blank; None: as many as one species."""

    classes: int = 10
    per_class: int = 200
    size: int = 128
    blank: float | None = None
    seed: int = 0
    zoo: int = 0  # 0: the named species; N >= 1: species drawn at random, seeded by N (pretraining)
    night: float = 0.35  # share of bursts taken at night (infra-red)
    morphs: int = 0  # 1: pairs of species in crossed morphs (shape x coat), see the module docstring

    def __post_init__(self) -> None:
        if self.zoo == 0 and not 1 <= self.classes <= len(SPECIES):
            raise ValueError(f"scenes: classes={self.classes}; the named species are {len(SPECIES)} "
                             f"(use zoo=N for more)")
        if self.classes < 1 or self.per_class < 1:
            raise ValueError("scenes: classes and per_class must be >= 1")
        if self.size < 32:
            raise ValueError(f"scenes: size={self.size}; must be >= 32")
        if self.blank is not None and not 0.0 <= self.blank < 1.0:
            raise ValueError(f"scenes: blank={self.blank}; must be in [0, 1)")
        if not 0.0 <= self.night <= 1.0:
            raise ValueError(f"scenes: night={self.night}; must be in [0, 1]")
        if self.morphs not in (0, 1):
            raise ValueError(f"scenes: morphs={self.morphs}; must be 0 or 1")
        if self.morphs and self.classes < 2:
            raise ValueError("scenes: morphs=1 needs classes >= 2 (species are crossed in pairs)")

    @property
    def blank_count(self) -> int:
        if self.blank is None:
            return self.per_class
        animals = self.classes * self.per_class
        return int(round(self.blank / (1.0 - self.blank) * animals))


def species_for(spec: SceneSpec) -> list[Species]:
    if spec.zoo == 0:
        return list(SPECIES[: spec.classes])
    return [random_species(spec.zoo, i) for i in range(spec.classes)]


SHAPE_TRAITS = ("body_h", "head", "snout", "neck", "ears", "ear_size", "legs", "leg_w", "tail", "tail_len")


def crossed(shape: Species, coat: Species, name: str) -> Species:
    """A species with ``shape``'s body (proportions, ears, legs, tail) and ``coat``'s colours and pattern."""
    return replace(coat, name=name, **{k: getattr(shape, k) for k in SHAPE_TRAITS})


def morph_of(spec: SceneSpec, species: list[Species], index: int, second: bool) -> Species:
    """The look of species ``index`` in one burst: itself, or with ``morphs=1`` one of its pair's crossed morphs."""
    sp = species[index]
    partner = index ^ 1
    if not spec.morphs or partner >= len(species):
        return sp  # an odd class out has one morph
    a, b = (sp, species[partner]) if index % 2 == 0 else (species[partner], sp)
    if index % 2 == 0:
        return crossed(b, b, sp.name) if second else sp
    return crossed(b, a, sp.name) if second else crossed(a, b, sp.name)


def class_names(spec: SceneSpec) -> list[str]:
    """Sorted like an ImageFolder of the written files, so ``folder:`` on them gives the same label indices."""
    names = [s.name for s in species_for(spec)]
    return sorted(names + ([BLANK] if spec.blank_count > 0 else []))


@dataclass(frozen=True)
class Frame:
    """One image of the dataset: its class name and index, burst (global id and within-class index), frame."""

    label: int
    name: str
    burst: int
    class_burst: int
    frame: int
    burst_len: int


def _burst_lengths(seed: int, cls: int, total: int) -> list[int]:
    r = np.random.default_rng([seed, cls, 104729])
    out: list[int] = []
    while sum(out) < total:
        out.append(int(r.integers(MIN_BURST, MAX_BURST + 1)))
    out[-1] -= sum(out) - total  # the last burst is cut to the count asked for (it may be shorter than 3)
    return [n for n in out if n > 0]


def burst_layout(spec: SceneSpec) -> list[Frame]:
    """Every frame of the dataset in a fixed order (by class name, burst, frame)."""
    names = class_names(spec)
    frames: list[Frame] = []
    burst_id = 0
    for label, name in enumerate(names):
        total = spec.blank_count if name == BLANK else spec.per_class
        for b, n in enumerate(_burst_lengths(spec.seed, label, total)):
            frames += [Frame(label, name, burst_id, b, f, n) for f in range(n)]
            burst_id += 1
    return frames


_DAY_SLOTS = (7.0, 9.5, 12.0, 14.5)  # start hours of the four 2.5-hour slots of a day...
_NIGHT_SLOTS = (20.0, 22.5, 25.0, 27.5)  # ...and of a night (hours past 24 are the next morning)


def burst_time(spec: SceneSpec, frame: Frame) -> datetime:
    """Capture time. Burst b is taken on day b // 4 in slot b % 4 (day or night slots as the burst is lit), at least
    0.25 h from the slot's ends, so two bursts are always more than 20 minutes apart; frames are 1 s apart."""
    r = np.random.default_rng([spec.seed, frame.burst, 3])
    slot = (_NIGHT_SLOTS if _is_night(spec, frame.burst) else _DAY_SLOTS)[frame.burst % 4]
    hours = slot + float(r.uniform(0.25, 2.25))
    start = START_TIME + timedelta(days=frame.burst // 4, seconds=int(hours * 3600))
    return start + timedelta(seconds=frame.frame)


def _is_night(spec: SceneSpec, burst: int) -> bool:
    return bool(np.random.default_rng([spec.seed, burst, 5]).random() < spec.night)


# ------------------------------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # bundled with scikit-learn: read from disk, never downloaded

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def _noise(r: np.random.Generator, size: int, octaves: tuple[int, ...] = (4, 8, 16, 48)) -> np.ndarray:
    """Fractal value noise in [0, 1], [size, size]: random grids upsampled bicubically and summed."""
    acc = np.zeros((size, size), np.float32)
    total = 0.0
    for i, k in enumerate(octaves):
        grid = Image.fromarray((r.random((k, k)) * 255).astype(np.uint8))
        weight = 0.55**i
        acc += weight * np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
        total += weight
    acc /= total
    lo, hi = acc.min(), acc.max()
    return (acc - lo) / max(hi - lo, 1e-6)


_GROUNDS = (  # (dark, light) RGB palettes of ground textures
    ((70, 50, 35), (150, 120, 85)),  # soil
    ((140, 120, 90), (220, 200, 160)),  # sand
    ((55, 45, 30), (120, 95, 50)),  # leaf litter
    ((40, 70, 30), (110, 150, 70)),  # grass
    ((80, 80, 75), (160, 160, 150)),  # gravel
)


def _ground(r: np.random.Generator, size: int) -> np.ndarray:
    dark, light = (np.array(c, np.float32) for c in _GROUNDS[int(r.integers(len(_GROUNDS)))])
    t = _noise(r, size)[..., None]
    speck = _noise(r, size, (32, 64))[..., None]
    img = dark + (light - dark) * (0.75 * t + 0.25 * speck)
    return img * float(r.uniform(0.8, 1.15))


def _photo_crop(r: np.random.Generator, size: int) -> np.ndarray:
    photo = _photos()[int(r.integers(2))]
    h, w = photo.shape[:2]
    side = int(r.uniform(0.2, 0.9) * min(h, w))
    y, x = int(r.integers(0, h - side + 1)), int(r.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BILINEAR)
    img = np.asarray(crop, np.float32)
    if r.random() < 0.5:
        img = img[:, ::-1]
    grey = img.mean(axis=2, keepdims=True)
    return grey + (img - grey) * float(r.uniform(0.5, 1.1))  # partly desaturated: camera traps are not vivid


def _vegetation(draw: ImageDraw.ImageDraw, r: np.random.Generator, size: int, y0: float, n: int,
                scale: float = 1.0) -> None:
    """Grass blades and small shrubs rooted at y >= y0."""
    for _ in range(n):
        x = float(r.uniform(-0.05, 1.05)) * size
        y = float(r.uniform(y0, 1.02)) * size
        length = float(r.uniform(0.04, 0.16)) * size * scale
        lean = float(r.uniform(-0.5, 0.5))
        g = r.uniform(0.25, 0.75)
        colour = (int(90 * g + 20), int(150 * g + 40), int(60 * g + 10))
        draw.line([(x, y), (x + lean * length, y - length)], fill=colour, width=max(1, int(size / 120 * scale)))
    for _ in range(int(n / 25)):
        cx, cy = float(r.uniform(0, 1)) * size, float(r.uniform(y0, 1.0)) * size
        rad = float(r.uniform(0.03, 0.09)) * size * scale
        g = r.uniform(0.3, 0.6)
        draw.ellipse([cx - rad, cy - rad * 0.7, cx + rad, cy + rad * 0.5],
                     fill=(int(60 * g), int(110 * g + 20), int(40 * g)))


def _background(r: np.random.Generator, size: int) -> Image.Image:
    kind = r.random()
    if kind < 0.35:  # a photograph alone
        img = _photo_crop(r, size)
        horizon = 1.1
    elif kind < 0.7:  # ground texture, a vegetation line far away
        img = _ground(r, size)
        horizon = float(r.uniform(-0.1, 0.35))
        if horizon > 0:
            far = _ground(np.random.default_rng(r.integers(1 << 32)), size) * np.array([0.5, 0.8, 0.45], np.float32)
            img[: int(horizon * size)] = far[: int(horizon * size)]
    else:  # a photograph above a ground band
        img = _photo_crop(r, size)
        horizon = float(r.uniform(0.35, 0.7))
        ground = _ground(r, size)
        cut = int(horizon * size)
        img[cut:] = ground[cut:]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if horizon < 1.0:
        _vegetation(draw, r, size, max(horizon, 0.0), int(r.integers(20, 120)))
    return pil


# ---------------------------------------------------------------------------------------------------- animals


def _rgb(hsv: tuple[float, float, float], jitter: np.ndarray | None = None, factor: float = 1.0) -> tuple[int, ...]:
    h, s, v = hsv
    if jitter is not None:
        h, s, v = (h + jitter[0]) % 1.0, min(max(s + jitter[1], 0.0), 1.0), min(max(v + jitter[2], 0.02), 1.0)
    rgb = colorsys.hsv_to_rgb(h, s, min(v * factor, 1.0))
    return tuple(int(255 * c) for c in rgb) + (255,)


@dataclass(frozen=True)
class Individual:
    """One animal of a burst: its species' traits varied by individual."""

    sp: Species
    jitter: np.ndarray  # HSV offsets of its coat
    prop: np.ndarray  # multipliers of body_h, head, legs, tail_len, ear_size (each ~ 1 ± 0.1)
    pattern_seed: int


def _individual(sp: Species, r: np.random.Generator) -> Individual:
    return Individual(sp, r.normal(0, [0.015, 0.06, 0.07]), r.uniform(0.88, 1.12, size=5), int(r.integers(1 << 31)))


def _draw_animal(ind: Individual, phase: float, head_pose: float, tail_pose: float, night: bool,
                 unit: float) -> Image.Image:
    """The animal facing right on a transparent canvas (unit = body length in pixels), cropped to its extent."""
    sp, p = ind.sp, ind.prop
    bl = unit
    bh = bl * sp.body_h * p[0]
    hr = bl * sp.head * p[1]
    leg = bh * sp.legs * p[2]
    tail = bl * sp.tail_len * p[3]
    ear = hr * sp.ear_size * p[4]
    w = int(bl * 1.2 + hr * 3 + tail * 1.2 + 4 * unit / 10)
    h = int(bh * 1.2 + leg + hr * 2 + ear * 2.5 + bh * sp.neck + 10)
    canvas = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    cx = tail * 1.0 + bl * 0.55 + 2
    cy = h - leg - bh * 0.45 - 2
    base, accent = _rgb(sp.base, ind.jitter), _rgb(sp.accent, ind.jitter * 0.5)
    dark = _rgb(sp.base, ind.jitter, 0.7)
    light = _rgb((sp.base[0], sp.base[1] * 0.2, 0.95), None)

    # far legs, then tail, body, pattern, near legs, neck, head, ears, snout, eye
    lw = max(1, int(bh * sp.leg_w))
    hips, shoulders = cx - bl * 0.32, cx + bl * 0.3
    top = cy + bh * 0.15

    def legs(near: bool) -> None:
        for x0, ph in ((hips, phase), (shoulders, phase + math.pi)):
            a = 0.45 * math.sin(ph + (0 if near else math.pi))
            knee = (x0 + math.sin(a) * leg * 0.5, top + math.cos(a) * leg * 0.5)
            b = a - 0.35 * max(0.0, math.sin(ph)) if x0 == hips else a + 0.2
            foot = (knee[0] + math.sin(b) * leg * 0.55, knee[1] + math.cos(b) * leg * 0.55)
            colour = base if near else dark
            d.line([(x0, top), knee, foot], fill=colour, width=lw, joint="curve")
            d.ellipse([foot[0] - lw * 0.6, foot[1] - lw * 0.4, foot[0] + lw * 0.8, foot[1] + lw * 0.4], fill=dark)

    legs(False)
    # tail, from the rump
    tx, ty = cx - bl * 0.48, cy - bh * 0.15
    t_angle = math.pi + 0.5 - tail_pose * 0.9  # pointing back, raised or lowered by tail_pose
    pts = []
    for i in range(9):
        s = i / 8
        curl = 2.4 * s * s if sp.tail == "curled" else 0.0
        ang = t_angle - curl - (0.4 * s * s if sp.tail == "curled" else -0.25 * s)
        if not pts:
            pts.append((tx, ty))
        else:
            px, py = pts[-1]
            pts.append((px + math.cos(ang) * tail / 8, py - math.sin(ang) * tail / 8))
    if sp.tail == "short":
        d.ellipse([tx - tail * 0.9, ty - tail * 0.5, tx + tail * 0.3, ty + tail * 0.5],
                  fill=light if sp.tail_tip else base)
    else:
        width = {"thin": 0.18, "ringed": 0.22, "bushy": 0.42, "curled": 0.5}[sp.tail] * bh
        for i, (x, y) in enumerate(pts):
            s = i / 8
            rad = width * (0.45 + 0.6 * math.sin(math.pi * min(s, 0.85))) if sp.tail in ("bushy", "curled") \
                else width * (1.0 - 0.55 * s)
            colour = base
            if sp.tail == "ringed" and i % 2 == 1:
                colour = accent
            if sp.tail_tip and i >= 7:
                colour = light
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=colour)
            if i < 8:
                nx, ny = pts[i + 1]
                d.line([(x, y), (nx, ny)], fill=colour, width=max(1, int(rad * 1.6)))
    # body
    body_box = [cx - bl * 0.5, cy - bh * 0.5, cx + bl * 0.5, cy + bh * 0.5]
    d.ellipse(body_box, fill=base)
    d.ellipse([cx - bl * 0.5, cy - bh * 0.58, cx - bl * 0.05, cy + bh * 0.35], fill=base)  # haunch
    # neck and head position
    hx = cx + bl * 0.5 + hr * 0.55
    hy = cy - bh * 0.25 - bh * sp.neck * (0.6 + 0.5 * head_pose) + (hr * 1.2 if head_pose < -0.6 else 0.0)
    d.line([(cx + bl * 0.32, cy - bh * 0.1), (hx - hr * 0.2, hy + hr * 0.2)], fill=base, width=int(hr * 1.5))
    # coat pattern, clipped to the body
    body_mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(body_mask).ellipse(body_box, fill=255)
    pat = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    pd = ImageDraw.Draw(pat)
    pr = np.random.default_rng(ind.pattern_seed)
    ps = sp.pattern_scale
    if sp.pattern in ("spots", "rosettes"):
        for _ in range(int(22 / ps)):
            x, y = pr.uniform(body_box[0], body_box[2]), pr.uniform(body_box[1], body_box[3])
            rad = bh * 0.07 * ps * pr.uniform(0.7, 1.3)
            pd.ellipse([x - rad, y - rad, x + rad, y + rad], fill=accent)
            if sp.pattern == "rosettes":
                pd.ellipse([x - rad * 0.45, y - rad * 0.45, x + rad * 0.45, y + rad * 0.45], fill=base)
    elif sp.pattern == "stripes":
        n = int(7 / ps)
        for i in range(n):
            x = body_box[0] + (i + 0.5 + pr.uniform(-0.15, 0.15)) * bl / n
            pd.line([(x, body_box[1]), (x - bh * 0.15, body_box[3])], fill=accent, width=max(1, int(bh * 0.09 * ps)))
    elif sp.pattern == "saddle":
        pd.ellipse([cx - bl * 0.45, cy - bh * 0.75, cx + bl * 0.45, cy - bh * 0.05 * ps], fill=accent)
    elif sp.pattern == "dorsal":
        pd.line([(cx - bl * 0.5, cy - bh * 0.38), (cx + bl * 0.5, cy - bh * 0.38)], fill=accent,
                width=max(1, int(bh * 0.12 * ps)))
    if sp.belly:
        pd.ellipse([cx - bl * 0.38, cy + bh * 0.15, cx + bl * 0.4, cy + bh * 0.62], fill=light)
    canvas.paste(pat, (0, 0), Image.fromarray(np.minimum(np.asarray(pat)[..., 3], np.asarray(body_mask))))
    legs(True)
    # head
    d.ellipse([hx - hr, hy - hr * 0.9, hx + hr, hy + hr * 0.9], fill=base)
    if sp.pattern == "dorsal" and sp.name.startswith("badger"):  # the badger's head stripe
        d.line([(hx - hr * 0.6, hy - hr * 0.7), (hx + hr * 0.9, hy - hr * 0.1)], fill=accent, width=int(hr * 0.4))
    sn = hr * sp.snout
    d.ellipse([hx + hr * 0.3, hy - hr * 0.2, hx + hr * 0.5 + sn, hy + hr * 0.55], fill=base)
    d.ellipse([hx + hr * 0.35 + sn, hy - hr * 0.05, hx + hr * 0.6 + sn, hy + hr * 0.2], fill=(20, 15, 15, 255))
    ex, ey = hx - hr * 0.2, hy - hr * 0.7
    if sp.ears == "pointed":
        d.polygon([(ex - ear * 0.35, ey + ear * 0.2), (ex + ear * 0.35, ey + ear * 0.2),
                   (ex - ear * 0.05, ey - ear * 1.1)], fill=base)
        d.polygon([(ex - ear * 0.15, ey + ear * 0.1), (ex + ear * 0.15, ey + ear * 0.1),
                   (ex - ear * 0.04, ey - ear * 0.6)], fill=accent)
    elif sp.ears == "round":
        d.ellipse([ex - ear * 0.45, ey - ear * 0.7, ex + ear * 0.4, ey + ear * 0.3], fill=base)
        d.ellipse([ex - ear * 0.25, ey - ear * 0.45, ex + ear * 0.2, ey + ear * 0.1], fill=accent)
    elif sp.ears == "long":
        tilt = 0.35 + 0.3 * head_pose
        for off in (0.0, 0.3):
            x0, y0 = ex - off * hr, ey + ear * 0.2
            x1, y1 = x0 - math.sin(tilt) * ear * 2.0, y0 - math.cos(tilt) * ear * 2.0
            d.line([(x0, y0), (x1, y1)], fill=base if off == 0 else dark, width=max(1, int(ear * 0.45)))
            d.ellipse([x1 - ear * 0.22, y1 - ear * 0.22, x1 + ear * 0.22, y1 + ear * 0.22], fill=accent)
    eye = max(1.0, hr * 0.16)
    ey_x, ey_y = hx + hr * 0.35, hy - hr * 0.2
    d.ellipse([ey_x - eye, ey_y - eye, ey_x + eye, ey_y + eye],
              fill=(255, 255, 240, 255) if night else (15, 10, 10, 255))
    box = canvas.getbbox()
    return canvas.crop(box) if box else canvas


# ------------------------------------------------------------------------------------------------------ frames


def _occluder(r: np.random.Generator, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    """Foreground grass, a branch or a rock, in front of part of the animal's box (x0, y0, x1, y1)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    kind = r.random()
    if kind < 0.5:  # tall grass across the lower part of the animal
        top = y0 + (y1 - y0) * float(r.uniform(0.35, 0.75))
        for _ in range(int(r.integers(15, 45))):
            x = float(r.uniform(x0 - 0.1 * size, x1 + 0.1 * size))
            length = float(r.uniform(0.5, 1.3)) * (size - top)
            g = r.uniform(0.3, 0.8)
            d.line([(x, size), (x + float(r.uniform(-0.3, 0.3)) * length, size - length)],
                   fill=(int(80 * g + 30), int(140 * g + 40), int(50 * g + 10), 255), width=max(1, size // 90))
    elif kind < 0.8:  # a branch
        y = float(r.uniform(y0, y1))
        g = r.uniform(0.2, 0.45)
        ends = [(-2, y + float(r.uniform(-0.2, 0.2)) * size), (size + 2, y + float(r.uniform(-0.2, 0.2)) * size)]
        d.line(ends, fill=(int(120 * g), int(90 * g), int(60 * g), 255),
               width=max(2, int(size * float(r.uniform(0.02, 0.05)))))
        for _ in range(int(r.integers(5, 15))):
            lx, ly = float(r.uniform(0, size)), y + float(r.uniform(-0.08, 0.08)) * size
            rad = size * 0.025
            d.ellipse([lx - rad, ly - rad * 0.6, lx + rad, ly + rad * 0.6], fill=(50, int(100 * g + 40), 35, 255))
    else:  # a rock in front of one end
        side = x0 if r.random() < 0.5 else x1
        rw, rh = (x1 - x0) * float(r.uniform(0.25, 0.5)), (y1 - y0) * float(r.uniform(0.4, 0.8))
        v = int(r.integers(70, 150))
        d.ellipse([side - rw, y1 - rh, side + rw, y1 + rh * 0.5], fill=(v, v - 5, v - 15, 255))
    return layer


def _night(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Infra-red flash: grey (vegetation bright in near-IR), bright centre falling off, low contrast, noise."""
    ir = 0.25 * img[..., 0] + 0.6 * img[..., 1] + 0.15 * img[..., 2]
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = float(r.uniform(0.4, 0.7)), float(r.uniform(0.35, 0.65))
    falloff = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / float(r.uniform(0.08, 0.25)))
    ir = ir * (0.35 + 0.85 * falloff) * float(r.uniform(0.8, 1.2))
    ir = ir + r.normal(0, float(r.uniform(4, 12)), ir.shape)
    tint = np.array([1.0, 1.0, float(r.uniform(0.97, 1.05))], np.float32)
    return ir[..., None] * tint


@functools.lru_cache(maxsize=4)
def _scene(seed: int, label: int, class_burst: int, size: int) -> np.ndarray:
    """The background of a burst (the camera does not move), rendered once for all its frames."""
    out = np.asarray(_background(np.random.default_rng([seed, label, class_burst, 11]), size))
    out.flags.writeable = False
    return out


def render(spec: SceneSpec, frame: Frame) -> np.ndarray:
    """The pixels of one frame: uint8 [size, size, 3]. A pure function of (spec, frame)."""
    size = spec.size
    rb = np.random.default_rng([spec.seed, frame.label, frame.class_burst, 12])  # the burst's animal
    rf = np.random.default_rng([spec.seed, frame.label, frame.class_burst, frame.frame, 13])  # this frame's
    night = _is_night(spec, frame.burst)
    bg = Image.fromarray(_scene(spec.seed, frame.label, frame.class_burst, size))
    occluder_seed = int(rb.integers(1 << 31))
    light = float(rb.uniform(0.7, 1.2))
    warm = rb.normal(0, 0.05, 3)
    if frame.name != BLANK:
        species = species_for(spec)
        k = next(i for i, s in enumerate(species) if s.name == frame.name)
        # its own stream, so that specs without morphs keep their pixels
        second = bool(np.random.default_rng([spec.seed, frame.label, frame.class_burst, 17]).random() < 0.5)
        sp = morph_of(spec, species, k, second)
        ind = _individual(sp, rb)
        area = float(rb.uniform(*AREA_RANGE)) * size * size
        flip = rb.random() < 0.5
        phase0, head0, tail0 = float(rb.uniform(0, 2 * math.pi)), float(rb.uniform(-1, 1)), float(rb.uniform(-1, 1))
        ux, uy = float(rb.uniform(0.05, 0.95)), float(rb.uniform(0.15, 0.95))
        vx, vy = float(rb.normal(0, 0.03)), float(rb.normal(0, 0.01))  # small motion per frame (fraction of size)
        occlude = rb.random() < 0.5
        # the animal of this frame
        phase = phase0 + 0.9 * frame.frame
        head = float(np.clip(head0 + rf.normal(0, 0.25), -1, 1))
        tail = float(np.clip(tail0 + rf.normal(0, 0.2), -1, 1))
        ss = 2  # drawn at twice the size, then shrunk: smooth edges
        unit = math.sqrt(area / max(sp.body_h * 1.6, 0.5)) * 0.62 * ss
        sprite = _draw_animal(ind, phase, head, tail, night, unit)
        aw, ah = sprite.size
        k = math.sqrt(area / (aw * ah))  # scale the box to the drawn area exactly
        tw, th = max(2, int(aw * k)), max(2, int(ah * k))
        sprite = sprite.resize((tw, th), Image.Resampling.BILINEAR)
        if flip:
            sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        move = (vx if not flip else -abs(vx) if vx > 0 else vx) * frame.frame * size
        x = int(ux * (size - tw) + move) if tw < size else int((size - tw) / 2 + move)
        y = int(uy * (size - th) + vy * frame.frame * size) if th < size else int((size - th) / 2)
        bg = bg.convert("RGBA")
        shadow = Image.new("RGBA", bg.size, (0, 0, 0, 0))
        ImageDraw.Draw(shadow).ellipse([x + tw * 0.1, y + th * 0.9, x + tw * 0.9, y + th * 1.05], fill=(0, 0, 0, 60))
        bg.alpha_composite(shadow)
        bg.paste(sprite, (x, y), sprite)
        if occlude:
            bg.alpha_composite(_occluder(np.random.default_rng(occluder_seed), size, (x, y, x + tw, y + th)))
        bg = bg.convert("RGB")
    else:
        # blank: the same scene; wind and light change a little between frames
        if rb.random() < 0.5:
            ox, oy = float(rb.uniform(0.1, 0.9)) * size, float(rb.uniform(0.3, 0.9)) * size
            w = size * float(rb.uniform(0.15, 0.5))
            occ = _occluder(np.random.default_rng(occluder_seed), size, (ox - w, oy - w / 2, ox + w, oy + w / 2))
            occ = occ.transform(occ.size, Image.Transform.AFFINE, (1, 0, float(rf.normal(0, 1.0)), 0, 1, 0))
            bg = Image.alpha_composite(bg.convert("RGBA"), occ).convert("RGB")
    img = np.asarray(bg, np.float32)
    if night:
        img = _night(img, rf)
    else:
        img = img * light * (1.0 + warm) * float(1.0 + rf.normal(0, 0.03))
        img = img + rf.normal(0, 2.0, img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rf.random() < 0.3:  # slight motion or focus blur
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(float(rf.uniform(0.3, 0.8)))))
    return out


def _render_chunk(spec: SceneSpec, frames: list[Frame]) -> np.ndarray:
    return np.stack([render(spec, f) for f in frames])


def generate(spec: SceneSpec, workers: int = 1) -> tuple[np.ndarray, list[Frame]]:
    """All frames: uint8 [N, size, size, 3] and their :class:`Frame` records (same order). ``workers`` > 1 renders
    in that many processes (the same pixels: every frame is a pure function of the spec and its record)."""
    frames = burst_layout(spec)
    images = np.empty((len(frames), spec.size, spec.size, 3), np.uint8)
    if workers <= 1 or len(frames) < 256:
        for i, f in enumerate(frames):
            images[i] = render(spec, f)
        return images, frames
    import concurrent.futures
    import multiprocessing

    # contiguous chunks keep a burst's frames together, so each process reuses the burst's background
    step = max(64, len(frames) // (workers * 8))
    starts = range(0, len(frames), step)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for start, chunk in zip(starts, pool.map(_render_chunk, [spec] * len(starts),
                                                 [frames[s:s + step] for s in starts]), strict=True):
            images[start:start + len(chunk)] = chunk
    return images, frames


def iter_frames(spec: SceneSpec) -> Iterator[tuple[Frame, np.ndarray]]:
    for f in burst_layout(spec):
        yield f, render(spec, f)


def with_size(spec: SceneSpec, size: int) -> SceneSpec:
    return replace(spec, size=size)


# ------------------------------------------------------------------------------------------- the dataset spec

SPEC_DEFAULTS: dict[str, Any] = {"classes": 10, "per_class": 200, "size": 128, "blank": None, "seed": 0,
                                 "split_seed": None, "zoo": 0, "night": 0.35, "morphs": 0, "lazy": 0,
                                 "workers": 1}
SPEC_FORM = ("scenes or scenes:classes=10,per_class=200,size=128,blank=0.5,seed=0,split_seed=0,zoo=0,night=0.35,"
             "morphs=0,lazy=0,workers=1")


@dataclass(frozen=True)
class ScenesOptions:
    """A parsed ``scenes:`` spec: what to generate, plus how to split and whether to render on access."""

    scene: SceneSpec
    split_seed: int | None = None  # None: the caller's seed; set: every command splits the same way
    lazy: bool = False
    workers: int = 1  # processes that render the frames up front (how, not what: the pixels are the same)

    def __str__(self) -> str:
        s = self.scene
        parts = [f"classes={s.classes}", f"per_class={s.per_class}", f"size={s.size}"]
        if s.blank is not None:
            parts.append(f"blank={s.blank:g}")
        parts.append(f"seed={s.seed}")
        if self.split_seed is not None:
            parts.append(f"split_seed={self.split_seed}")
        if s.zoo:
            parts.append(f"zoo={s.zoo}")
        if s.night != SPEC_DEFAULTS["night"]:
            parts.append(f"night={s.night:g}")
        if s.morphs:
            parts.append(f"morphs={s.morphs}")
        if self.lazy:
            parts.append("lazy=1")
        if self.workers != 1:
            parts.append(f"workers={self.workers}")
        return "scenes:" + ",".join(parts)


def parse_options(spec: str, arg: str) -> ScenesOptions:
    """``key=value,...`` of a scenes spec; raises ValueError naming the spec and the bad option."""
    opts = dict(SPEC_DEFAULTS)
    seen: set[str] = set()
    for item in arg.split(",") if arg.strip() else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"data spec {spec!r}: option {item!r} is not key=value; expected {SPEC_FORM}")
        if key not in SPEC_DEFAULTS:
            raise ValueError(f"data spec {spec!r}: unknown scenes option {key!r}; expected some of "
                             f"{sorted(SPEC_DEFAULTS)}")
        if key in seen:
            raise ValueError(f"data spec {spec!r}: scenes option {key!r} given twice")
        seen.add(key)
        try:
            opts[key] = float(value) if key in ("blank", "night") else int(value)
        except ValueError:
            kind = "a number" if key in ("blank", "night") else "an integer"
            raise ValueError(f"data spec {spec!r}: scenes option {key}={value!r} is not {kind}") from None
        if key not in ("blank", "night") and opts[key] < 0:
            raise ValueError(f"data spec {spec!r}: scenes option {key} must be >= 0")
    try:
        scene = SceneSpec(classes=opts["classes"], per_class=opts["per_class"], size=opts["size"],
                          blank=opts["blank"], seed=opts["seed"], zoo=opts["zoo"], night=opts["night"],
                          morphs=opts["morphs"])
    except ValueError as err:
        raise ValueError(f"data spec {spec!r}: {err}") from None
    if opts["workers"] < 1:
        raise ValueError(f"data spec {spec!r}: scenes option workers must be >= 1")
    return ScenesOptions(scene=scene, split_seed=opts["split_seed"], lazy=bool(opts["lazy"]),
                         workers=opts["workers"])


@functools.lru_cache(maxsize=2)
def _generated(scene: SceneSpec, workers: int = 1) -> tuple[np.ndarray, tuple[Frame, ...]]:
    images, frames = generate(scene, workers)
    images.flags.writeable = False
    return images, tuple(frames)


def split_bursts(frames: list[Frame] | tuple[Frame, ...], *, seed: int, eval_fraction: float,
                 val_fraction: float) -> dict[str, list[int]]:
    """Frame indices of each split, drawn over bursts and per class (stratified): all frames of a burst land in the
    same split, since frames of one burst are near-duplicates and splitting them would leak the answer into the
    held-out set; each class contributes its share of bursts to every split."""
    member: dict[int, list[int]] = {}
    by_class: dict[int, list[int]] = {}
    for i, f in enumerate(frames):
        if f.burst not in member:
            by_class.setdefault(f.label, []).append(f.burst)
        member.setdefault(f.burst, []).append(i)
    out: dict[str, list[int]] = {"train": [], "eval": [], "search-train": [], "val": []}
    for label, bursts in sorted(by_class.items()):
        if len(bursts) < 3:
            raise ValueError(f"scenes: class {frames[member[bursts[0]][0]].name} has {len(bursts)} burst(s); "
                             "splitting needs >= 3 (raise per_class)")
        parts = split_indices(len(bursts), seed=seed * 1009 + label, eval_fraction=eval_fraction,
                              val_fraction=val_fraction)
        for key, idx in parts.items():
            out[key] += [i for b in idx for i in member[bursts[b]]]
    return {k: sorted(v) for k, v in out.items()}


def open_scenes(options: ScenesOptions, data_spec: Any, *, image_size: int, split: str, seed: int,
                eval_fraction: float, val_fraction: float, transform: Any) -> Any:
    """The ``scenes:`` dataset of :func:`moevit.data.open_dataset` (split over bursts)."""
    scene = options.scene
    frames = burst_layout(scene)
    split_seed = seed if options.split_seed is None else options.split_seed
    parts = split_bursts(frames, seed=split_seed, eval_fraction=eval_fraction, val_fraction=val_fraction)
    key = "eval" if split == "test" else split
    chosen = parts[key]
    origin = (f"{key} split ({round(100 * eval_fraction)}% eval, {round(100 * val_fraction)}% of train as val) drawn "
              f"over {len({f.burst for f in frames})} bursts with split seed {split_seed}, {len(frames)} frames")
    if split == "test":
        origin = f"no official test split, so test = eval: {origin}"
    common: dict[str, Any] = dict(targets=[frames[i].label for i in chosen], classes=class_names(scene),
                                  image_size=image_size, spec=data_spec, split=split, origin=origin,
                                  transform=transform)
    if options.lazy:
        return LazySceneDataset(scene=scene, items=[frames[i] for i in chosen], **common)
    images, _ = _generated(scene, options.workers)
    return SceneArrayDataset(images=images, items=chosen, **common)


def _to_tensor(array: np.ndarray, image_size: int) -> torch.Tensor:
    x = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        shrink = x.shape[-1] > image_size
        x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=shrink)[0]
    return x.contiguous()


class SceneArrayDataset(ImageDataset):
    """Items are row indices into the generated uint8 frames [N, S, S, 3] (a quarter of float32's memory)."""

    def __init__(self, *, images: np.ndarray, **kwargs: Any) -> None:
        self.images = images
        super().__init__(**kwargs)

    def _load(self, item: int) -> torch.Tensor:
        return _to_tensor(self.images[item], self.image_size)


class LazySceneDataset(ImageDataset):
    """Items are :class:`Frame` records rendered on access (the same pixels every time): for large corpora."""

    def __init__(self, *, scene: SceneSpec, **kwargs: Any) -> None:
        self.scene = scene
        super().__init__(**kwargs)

    def _load(self, item: Frame) -> torch.Tensor:
        return _to_tensor(render(self.scene, item), self.image_size)

    def _source(self, item: Frame) -> str:
        return f"scenes[{item.name} burst {item.class_burst} frame {item.frame}]"
