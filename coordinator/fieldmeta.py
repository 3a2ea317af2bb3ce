"""Field metadata of camera-trap images: capture time and camera from EXIF, a plausibility check of the camera
clock, and the grouping of images into sequences (bursts) with a sequence-level label.

Time: ``DateTimeOriginal`` (Exif IFD 0x8769, tag 0x9003), else IFD0 ``DateTime`` (0x0132), with
``OffsetTimeOriginal`` (0x9011) when the camera wrote one. A clock before 2000-01-01 or more than a day in the
future is not trusted (a camera that lost its battery restarts at its factory date): the file's modification time
is used instead and the image is flagged. Without any EXIF time the file's modification time is used, flagged too.

Camera: ``Make`` (0x010F), ``Model`` (0x0110) from IFD0 and ``BodySerialNumber`` (0xA431) from the Exif IFD.

Sequences are purely gap-based. Camera-specific burst counters (Reconyx "1 of 3", Bushnell and Browning
equivalents) live in proprietary MakerNotes that Pillow does not decode and that vary across firmware, so no
camera sequence tag is read: within one group (one deployment, or one folder and camera serial), images sorted by
time (then file name) start a new sequence when more than ``gap`` seconds passed since the previous image. Frames of a
camera clock that was reset are sequenced apart, on their raw EXIF times; an image timed by its file alone is a
sequence of its own (:func:`sequence_position`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SEQUENCE_GAP_S",
    "EARLIEST_PLAUSIBLE",
    "ImageMeta",
    "SequenceFrame",
    "assign_sequences",
    "parse_exif_datetime",
    "parse_iso",
    "read_image_meta",
    "sequence_label",
    "sequence_position",
]

log = logging.getLogger("moe-coordinator")

DEFAULT_SEQUENCE_GAP_S = 60.0
EARLIEST_PLAUSIBLE = datetime(2000, 1, 1)
FUTURE_SLACK = timedelta(days=1)  # camera clocks run on local time: a day covers any time zone

EXIF_IFD = 0x8769
TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_DATETIME = 0x0132
TAG_DATETIME_ORIGINAL = 0x9003
TAG_OFFSET_TIME_ORIGINAL = 0x9011
TAG_BODY_SERIAL = 0xA431

# time_source values
SOURCE_EXIF_ORIGINAL = "exif:DateTimeOriginal"
SOURCE_EXIF_DATETIME = "exif:DateTime"
SOURCE_MTIME = "file:mtime"
SOURCE_NONE = "none"

# time_flags values (any flag means: do not trust this time blindly)
FLAG_NO_EXIF_TIME = "no_exif_time"
FLAG_UNPARSEABLE = "exif_time_unparseable"
FLAG_BEFORE_2000 = "clock_before_2000"
FLAG_FUTURE = "clock_in_future"
FLAG_MTIME_IMPLAUSIBLE = "mtime_implausible"
FLAG_NO_TIME = "no_time"

_EXIF_TIME = re.compile(r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"\s*([+-])(\d{2}):?(\d{2})\s*\Z")


@dataclass(frozen=True)
class ImageMeta:
    """What an image file says about when and with which camera it was taken."""

    datetime: str | None  # ISO 8601 wall-clock time; with a UTC offset when one is known (EXIF offset, mtime)
    time_source: str
    time_flags: tuple[str, ...] = ()
    exif_datetime: str | None = None  # the raw EXIF value when it was not trusted
    make: str | None = None
    model: str | None = None
    serial: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The fields a per-image results record carries."""
        rec: dict[str, Any] = {"datetime": self.datetime, "time_source": self.time_source,
                               "time_flags": list(self.time_flags)}
        if self.exif_datetime is not None:
            rec["exif_datetime"] = self.exif_datetime
        camera = {k: v for k, v in (("make", self.make), ("model", self.model), ("serial", self.serial)) if v}
        if camera:
            rec["camera"] = camera
        return rec


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    s = str(value).replace("\x00", "").strip()
    return s or None


def parse_exif_datetime(value: Any, offset: Any = None) -> datetime | None:
    """``'2024:05:01 06:00:00'`` (and ``'2024-05-01 06:00:00'``) -> datetime; aware when ``offset`` is given
    (``'+02:00'``). None when it is not a valid date and time (e.g. ``'0000:00:00 00:00:00'``)."""
    s = _text(value)
    if s is None:
        return None
    m = _EXIF_TIME.match(s)
    if not m:
        return None
    try:
        dt = datetime(*(int(g) for g in m.groups()))
    except ValueError:
        return None
    off = _text(offset)
    if off:
        mo = _OFFSET.match(off)
        # an offset of 24 h or more ("+24:00", "+99:99") is no time zone: the wall-clock time stays, naive
        if mo and int(mo[2]) * 60 + int(mo[3]) < 24 * 60:
            minutes = int(mo[2]) * 60 + int(mo[3])
            dt = dt.replace(tzinfo=timezone(timedelta(minutes=-minutes if mo[1] == "-" else minutes)))
    return dt


def clip_text(value: str, limit: int = 40) -> str:
    """``repr`` of an untrusted value, cut to ``limit`` characters for a log line."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def parse_iso(value: str | None) -> datetime | None:
    """An ISO 8601 string as written in results (``2024-05-01T06:00:00`` or with an offset or ``Z``)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _implausible(dt: datetime, now: datetime) -> str | None:
    naive = dt.replace(tzinfo=None)
    if naive < EARLIEST_PLAUSIBLE:
        return FLAG_BEFORE_2000
    reference = now.astimezone(dt.tzinfo).replace(tzinfo=None) if dt.tzinfo else now.replace(tzinfo=None)
    if naive > reference + FUTURE_SLACK:
        return FLAG_FUTURE
    return None


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def read_image_meta(path: str | Path, *, now: datetime | None = None) -> ImageMeta:
    """EXIF time and camera of ``path``; never raises (an unreadable file gives the mtime, or no time at all).

    EXIF is untrusted input: whatever a value does to the parsing (a time zone of 24 h, a date at the end of the
    calendar), the image gets the file's time instead, flagged, and a warning naming the file is logged."""
    now = now or datetime.now().astimezone()
    try:
        return _read_image_meta(path, now)
    except Exception as e:  # noqa: BLE001 - a metadata value never ends a run
        log.warning("%s: EXIF metadata not usable (%s: %s); the file's time is used instead", path,
                    type(e).__name__, e)
        return _mtime_meta(path, now, [FLAG_UNPARSEABLE], None, None, None, None)


def _read_image_meta(path: str | Path, now: datetime) -> ImageMeta:
    original = datetime_tag = offset = make = model = serial = None
    try:
        from PIL import Image

        with Image.open(path) as im:
            exif = im.getexif()
            make, model = _text(exif.get(TAG_MAKE)), _text(exif.get(TAG_MODEL))
            datetime_tag = exif.get(TAG_DATETIME)
            sub = exif.get_ifd(EXIF_IFD)
            original, offset = sub.get(TAG_DATETIME_ORIGINAL), sub.get(TAG_OFFSET_TIME_ORIGINAL)
            serial = _text(sub.get(TAG_BODY_SERIAL))
    except Exception:  # noqa: BLE001 - an unreadable or EXIF-less file is data, not an error here
        pass
    flags: list[str] = []
    raw = original if _text(original) else datetime_tag
    source = SOURCE_EXIF_ORIGINAL if _text(original) else SOURCE_EXIF_DATETIME
    if _text(raw) is not None:
        off = _text(offset) if source == SOURCE_EXIF_ORIGINAL else None
        mo = _OFFSET.match(off) if off else None
        if off and not (mo and int(mo[2]) * 60 + int(mo[3]) < 24 * 60):
            log.warning("%s: EXIF OffsetTimeOriginal %s is not a time zone; the capture time is read without one",
                        path, clip_text(off))
        dt = parse_exif_datetime(raw, off)
        try:
            problem = FLAG_UNPARSEABLE if dt is None else _implausible(dt, now)
        except (OverflowError, ValueError):  # e.g. 9999-12-31 23:59 with an offset: beyond the calendar in UTC
            problem = FLAG_UNPARSEABLE
        if problem is None:
            assert dt is not None
            return ImageMeta(_iso(dt), source, (), None, make, model, serial)
        flags.append(problem)
        untrusted = _text(raw)
    else:
        flags.append(FLAG_NO_EXIF_TIME)
        untrusted = None
    return _mtime_meta(path, now, flags, untrusted, make, model, serial)


def _mtime_meta(path: str | Path, now: datetime, flags: list[str], untrusted: str | None, make: str | None,
                model: str | None, serial: str | None) -> ImageMeta:
    """The file's modification time in place of an EXIF time that is missing or not trusted."""
    try:
        mtime = datetime.fromtimestamp(os.stat(path).st_mtime).astimezone()
        implausible = _implausible(mtime, now)
    except (OSError, OverflowError, ValueError):
        return ImageMeta(None, SOURCE_NONE, (*flags, FLAG_NO_TIME), untrusted, make, model, serial)
    if implausible:
        flags.append(FLAG_MTIME_IMPLAUSIBLE)
    return ImageMeta(_iso(mtime), SOURCE_MTIME, tuple(flags), untrusted, make, model, serial)


# --------------------------------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class SequenceFrame:
    """A frame's place in its sequence."""

    seq_id: str
    frame_num: int  # 0-based, in time order
    seq_num_frames: int


def _wall(dt: datetime) -> datetime:
    """Wall-clock time for ordering inside one group (a camera's own clock)."""
    return dt.replace(tzinfo=None)


def assign_sequences(items: Iterable[tuple[str, str, datetime | None]], gap_s: float = DEFAULT_SEQUENCE_GAP_S,
                     ) -> dict[str, SequenceFrame]:
    """Group ``(key, group, time)`` items into sequences; returns key -> :class:`SequenceFrame`.

    Within a group, items sorted by (time, key) start a new sequence when the time since the previous item is more
    than ``gap_s`` seconds. An item without a time is a sequence of its own. Sequence ids are
    ``<group>-seq<NNNN>`` numbered from 1 in time order within the group (untimed items last).
    """
    if not gap_s >= 0 or math.isinf(gap_s):
        raise ValueError(f"the sequence gap must be a finite number of seconds >= 0, got {gap_s}")
    by_group: dict[str, list[tuple[str, datetime | None]]] = defaultdict(list)
    for key, group, t in items:
        by_group[group].append((key, t))
    out: dict[str, SequenceFrame] = {}
    gap = timedelta(seconds=gap_s)
    for group, members in by_group.items():
        timed = sorted(((_wall(t), k) for k, t in members if t is not None))
        untimed = sorted(k for k, t in members if t is None)
        runs: list[list[str]] = []
        prev: datetime | None = None
        for t, k in timed:
            if prev is None or t - prev > gap:
                runs.append([])
            runs[-1].append(k)
            prev = t
        runs += [[k] for k in untimed]
        for n, run in enumerate(runs, start=1):
            seq_id = f"{group}-seq{n:04d}"
            for i, k in enumerate(run):
                out[k] = SequenceFrame(seq_id, i, len(run))
    return out


_CLOCK_FLAGS = (FLAG_BEFORE_2000, FLAG_FUTURE)
_EXIF_SOURCES = (SOURCE_EXIF_ORIGINAL, SOURCE_EXIF_DATETIME)


def sequence_position(rec: Mapping[str, Any], group: str) -> tuple[str, datetime | None]:
    """The (group, time) a record is sequenced on.

    A trusted EXIF time sequences in ``group``. A camera clock that ran but was wrong (reset before 2000, or in the
    future) still orders its own frames: they are sequenced on their raw EXIF times in ``<group>~clock``, never
    with frames of a trusted clock. A file time (the fallback when the clock is missing or unreadable) is the copy
    time, not the capture time: such an image is a sequence of its own (time None).
    """
    flags = rec.get("time_flags") or ()
    source = rec.get("time_source")
    if not flags and (source is None or source in _EXIF_SOURCES):
        return group, parse_iso(rec.get("datetime"))
    raw = parse_exif_datetime(rec.get("exif_datetime")) if any(f in _CLOCK_FLAGS for f in flags) else None
    if raw is not None:
        return f"{group}~clock", raw.replace(tzinfo=None)
    return group, None


def sequence_label(frames: Sequence[Mapping[int, float] | Sequence[tuple[int, float]]]) -> tuple[int, float] | None:
    """Confidence-weighted majority over a sequence's frames.

    Each frame is its class probabilities (top-k ``[(class, p), ...]`` sorted by p, or a mapping). Each frame votes
    for its top-1 class with weight = its top-1 probability; the class with the largest total wins (ties: the
    smaller class index). The returned probability is the mean over the frames of each frame's probability of the
    winning class (0 where the winner is not among a frame's top-k), so it lies in [0, 1].
    """
    dists: list[dict[int, float]] = []
    for f in frames:
        d = dict(f.items()) if isinstance(f, Mapping) else {int(c): float(p) for c, p in f}
        if d:
            dists.append(d)
    if not dists:
        return None
    score: dict[int, float] = defaultdict(float)
    for d in dists:
        top = min(d, key=lambda c: (-d[c], c))
        score[top] += d[top]
    winner = min(score, key=lambda c: (-score[c], c))
    prob = sum(d.get(winner, 0.0) for d in dists) / len(dists)
    return winner, min(1.0, max(0.0, prob))
