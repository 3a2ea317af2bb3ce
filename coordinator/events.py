"""Event summaries: one message per sequence (burst) of a camera, for the uplink.

An ecologist's unit is the event, not the image, and a field link carries a few dozen bytes at a time. Each
sequence of a MegaDetector results document (``seq_id``, see docs/outputs.md) becomes an :class:`EventSummary`:
its top-3 classes with calibrated probabilities (each class's mean probability over the event's non-blank frames;
over all frames when every one is blank), frame count, first and last capture time, camera and deployment, the
model fingerprint and whether any frame was degraded.

Two encodings:

* JSON (:meth:`EventSummary.to_json`), the MQTT payload;
* a fixed 30-byte binary form (:meth:`EventSummary.to_bytes`, :func:`decode_event`) that fits one LoRaWAN uplink at
  EU868's slowest data rate (51 bytes) and an Iridium SBD message (340). Its layout is documented in
  docs/outputs.md ("Event summaries"); names travel as CRC-16 hashes the receiver maps back with its deployment
  list.

Message ids are deterministic (model, camera, event, first frame time, revision), so a consumer that keeps the ids
it has seen drops retransmissions; a re-scored event (a degraded result whose sites came back) is a new revision.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from moevit.coordinator.fieldmeta import parse_iso

from moevit.kinds import BLANK, class_kinds

__all__ = ["BINARY_SIZE", "EventSummary", "camera_hash", "decode_event", "events_from_megadetector"]

BINARY_VERSION = 1
# version|flags, model (4 bytes of the fingerprint), camera crc16, deployment crc16, event number, start (Unix s),
# span (s), frames, revision, then 3 x (class id uint16, probability uint8 in 1/255)
_HEAD = struct.Struct(">B4sHHIIHBB")
_TOP = struct.Struct(">HB")
BINARY_SIZE = _HEAD.size + 3 * _TOP.size
_NO_CLASS = 0xFFFF
FLAG_DEGRADED, FLAG_BLANK, FLAG_LOCAL_TIME, FLAG_NO_TIME = 0x1, 0x2, 0x4, 0x8


def camera_hash(name: str) -> int:
    """CRC-16/CCITT of a camera or deployment name (how the binary form names them)."""
    return binascii.crc_hqx(name.encode("utf-8"), 0xFFFF)


@dataclass(frozen=True)
class EventSummary:
    """One event (sequence) of one camera."""

    event_id: str  # the sequence id, <group>-seqNNNN
    camera: str
    deployment: str | None
    model: str  # fingerprint (16 hex digits)
    start: datetime | None  # first frame's capture time (aware: UTC offset known; naive: camera local time)
    end: datetime | None
    frames: int
    top: tuple[tuple[int, float], ...]  # up to 3 (class, calibrated probability), descending
    blank: bool
    degraded: bool
    revision: int = 0  # 1, 2, ... when the event is re-scored (a correction)

    @property
    def span_s(self) -> int:
        return int((self.end - self.start).total_seconds()) if self.start and self.end else 0

    @property
    def number(self) -> int:
        """The event's number within its camera (the NNNN of ``-seqNNNN``; 0 when the id has none)."""
        tail = self.event_id.rsplit("-seq", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    @property
    def message_id(self) -> str:
        """Deterministic id of this summary: the same event and revision always get the same id."""
        key = f"{self.model}|{self.camera}|{self.event_id}|{self.start.isoformat() if self.start else ''}"
        return f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-r{self.revision}"

    def to_json(self, labels: Mapping[str, str] | None = None,
                scientific: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The MQTT payload: plain JSON types, class names where ``labels`` (results' classification_categories)
        give them."""
        top = []
        for c, p in self.top:
            entry: dict[str, Any] = {"class": c, "p": round(p, 4)}
            if labels and str(c) in labels:
                entry["label"] = labels[str(c)]
            if scientific and str(c) in scientific:
                entry["scientific_name"] = scientific[str(c)]
            top.append(entry)
        return {"type": "event", "id": self.message_id, "event_id": self.event_id, "camera": self.camera,
                "deployment": self.deployment, "model": self.model,
                "start": self.start.isoformat() if self.start else None,
                "end": self.end.isoformat() if self.end else None, "span_s": self.span_s, "frames": self.frames,
                "top": top, "blank": self.blank, "degraded": self.degraded, "revision": self.revision}

    def to_bytes(self) -> bytes:
        """The 30-byte binary form (docs/outputs.md, "Event summaries")."""
        flags = (FLAG_DEGRADED * self.degraded) | (FLAG_BLANK * self.blank)
        if self.start is None:
            flags |= FLAG_NO_TIME
            start = 0
        else:
            if self.start.tzinfo is None:
                flags |= FLAG_LOCAL_TIME  # camera wall clock, sent as if it were UTC
            t = self.start if self.start.tzinfo else self.start.replace(tzinfo=timezone.utc)
            start = max(0, min(int(t.timestamp()), 0xFFFFFFFF))
        head = _HEAD.pack((BINARY_VERSION << 4) | flags, bytes.fromhex(self.model[:8].ljust(8, "0")),
                          camera_hash(self.camera), camera_hash(self.deployment or ""),
                          self.number & 0xFFFFFFFF, start, min(self.span_s, 0xFFFF), min(self.frames, 0xFF),
                          min(self.revision, 0xFF))
        tops = list(self.top[:3]) + [(_NO_CLASS, 0.0)] * (3 - len(self.top[:3]))
        return head + b"".join(_TOP.pack(c, max(0, min(255, round(p * 255)))) for c, p in tops)


def decode_event(data: bytes) -> dict[str, Any]:
    """The fields of a binary event summary; probabilities to within 1/510, names as CRC-16 hashes."""
    if len(data) != BINARY_SIZE:
        raise ValueError(f"an event summary is {BINARY_SIZE} bytes, got {len(data)}")
    vf, model, cam, dep, number, start, span, frames, revision = _HEAD.unpack_from(data)
    if vf >> 4 != BINARY_VERSION:
        raise ValueError(f"event summary version {vf >> 4}; this decoder reads version {BINARY_VERSION}")
    flags = vf & 0xF
    top = []
    for i in range(3):
        c, q = _TOP.unpack_from(data, _HEAD.size + i * _TOP.size)
        if c != _NO_CLASS:
            top.append((c, q / 255))
    when = None if flags & FLAG_NO_TIME else datetime.fromtimestamp(start, timezone.utc)
    if when is not None and flags & FLAG_LOCAL_TIME:
        when = when.replace(tzinfo=None)
    return {"version": vf >> 4, "model": model.hex(), "camera_crc16": cam, "deployment_crc16": dep,
            "number": number, "start": when, "span_s": span, "frames": frames, "revision": revision, "top": top,
            "degraded": bool(flags & FLAG_DEGRADED), "blank": bool(flags & FLAG_BLANK)}


def _frame_probs(im: Mapping[str, Any]) -> dict[int, float]:
    dets = im.get("detections")
    pairs = dets[0].get("classifications") if dets else im.get("moevit_classifications")
    return {int(c): float(p) for c, p in pairs or []}


def _is_blank(im: Mapping[str, Any], blank_class: int | None) -> bool:
    if "moevit_blank" in im:
        return bool(im["moevit_blank"])
    if im.get("detections") == []:
        return True
    probs = _frame_probs(im)
    return blank_class is not None and bool(probs) and max(probs, key=probs.__getitem__) == blank_class


def summarise(event_id: str, frames: Sequence[Mapping[str, Any]], *, model: str, camera: str,
              deployment: str | None = None, blank_class: int | None = None, revision: int = 0) -> EventSummary:
    """The summary of one event from its frames (MegaDetector image entries, in frame order)."""
    blanks = [_is_blank(im, blank_class) for im in frames]
    voters = [im for im, b in zip(frames, blanks, strict=True) if not b] or list(frames)
    mean: dict[int, float] = {}
    for im in voters:
        for c, p in _frame_probs(im).items():
            mean[c] = mean.get(c, 0.0) + p / len(voters)
    if not all(blanks) and blank_class is not None:
        mean.pop(blank_class, None)  # an event with an animal in a frame is not ranked against "blank"
    top = tuple(sorted(mean.items(), key=lambda cp: (-cp[1], cp[0]))[:3])
    times = [t for t in (parse_iso(im.get("datetime")) for im in frames) if t is not None]
    return EventSummary(event_id, camera, deployment, model, min(times) if times else None,
                        max(times) if times else None, len(frames), top, all(blanks),
                        any(bool(im.get("moevit_degraded")) for im in frames), revision)


def events_from_megadetector(doc: Mapping[str, Any], *, deployment_of: Mapping[str, str] | None = None,
                             deployment: str | None = None) -> list[EventSummary]:
    """Every sequence of a moevit MegaDetector document as a summary, in order of first appearance.

    The camera is the sequence's group (``<folder>@<serial>``); ``deployment_of`` maps a camera to its deployment,
    ``deployment`` is the one of the cameras it does not name.
    """
    model = doc["info"]["classifier_metadata"]["version"]
    kinds = class_kinds(doc.get("classification_categories") or {})
    blank_class = next((i for i, k in kinds.items() if k == BLANK), None)
    seqs: dict[str, list[Mapping[str, Any]]] = {}
    for im in doc["images"]:
        if im.get("seq_id") is not None:
            seqs.setdefault(im["seq_id"], []).append(im)
    out = []
    for seq, members in seqs.items():
        members = sorted(members, key=lambda im: im.get("frame_num", 0))
        camera = seq.rsplit("-seq", 1)[0]
        out.append(summarise(seq, members, model=model, camera=camera,
                             deployment=(deployment_of or {}).get(camera, deployment), blank_class=blank_class))
    return out


def as_dict(e: EventSummary) -> dict[str, Any]:
    """The dataclass fields (for tests and logs)."""
    return asdict(e)
