"""Results of a batch run: per-image records, the resumable run log, and MegaDetector batch output (format 1.6).

A *record* is one image's result as one JSON object (the lines of ``--out x.jsonl`` and of the run log)::

    {"file": "cam01/IMG_0001.JPG", "model": "<fingerprint>", "prediction": 2, "label": "Blue Jay",
     "confidence": 0.91, "top5": [[2, 0.91], [0, 0.05], ...], "degraded": false,
     "datetime": "2024-05-01T06:00:00", "time_source": "exif:DateTimeOriginal", "time_flags": [],
     "camera": {"make": "...", "model": "...", "serial": "..."}}

or, for an image that could not be classified, ``"error": "...", "error_kind": "unreadable" | "site"``.

Resume rule: records are appended to the log (``<out>.partial.jsonl`` for a ``.json`` output; a ``.jsonl`` output
is itself the log and is rewritten by each run) one ``write`` + ``fsync`` per batch, so a killed run loses at most
the batch in flight. A new run with the same ``.json`` ``--out`` reuses every record whose file is in its input
list, made by the same model fingerprint, that succeeded or failed for good (unreadable image); images that failed
because a site was down are retried. Records of another model are refused with a message (``--restart`` discards
them). See ``docs/outputs.md``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from moevit.coordinator.fieldmeta import (
    DEFAULT_SEQUENCE_GAP_S,
    assign_sequences,
    sequence_label,
    sequence_position,
)
from moevit.deploy.files import atomic_write

from moevit.data import SSW60_TAXA_COLUMNS, Taxon
from moevit.kinds import BLANK, HUMAN, VEHICLE, class_kinds

__all__ = [
    "CORRECTION_KEYS",
    "DETECTION_CATEGORIES",
    "FORMAT_VERSION",
    "RECORD_KEYS",
    "ImageRecord",
    "OutputLock",
    "PARTIAL_SUFFIX",
    "ResultLog",
    "ResultsError",
    "build_megadetector",
    "descriptions_for",
    "fingerprint_of",
    "is_jsonl",
    "load_previous",
    "partial_path",
    "read_jsonl",
    "read_taxa",
    "records_from_megadetector",
    "round_p",
    "sequence_group",
    "write_bytes_atomic",
    "write_json_atomic",
]

FORMAT_VERSION = "1.6"
DETECTION_CATEGORIES = {"1": "animal"}
WHOLE_IMAGE = [0.0, 0.0, 1.0, 1.0]
TOP_K = 5
DECIMALS = 4
PARTIAL_SUFFIX = ".partial.jsonl"
DETECTOR = "none: whole-image classifier (no detector; one whole-image detection per image)"


#: record keys of degraded images and their corrections, written to MegaDetector output as ``moevit_<key>``
CORRECTION_KEYS = ("degraded_sites", "degraded_at", "revision", "corrects")


class ResultsError(ValueError):
    """Results that cannot be used as asked (another model, not a results file); the message says what to do."""


#: the keys a record starts with, in this order (those it has); its field metadata follows, then ``blank``
RECORD_KEYS = ("file", "model", "prediction", "label", "confidence", "top5", "degraded", "degraded_sites",
               "degraded_at", "true", "error", "error_kind", "revision", "corrects")


@dataclass
class ImageRecord:
    """One image's result, typed. :meth:`to_json` is the record as a JSON object (a line of ``--out x.jsonl`` and of
    the run log): the fields of :data:`RECORD_KEYS` that are not None, in that order, then ``extra`` (the image's
    field metadata: datetime, time_source, time_flags, exif_datetime, camera; and any key this version does not
    know, kept as read), then ``blank`` when the model has a blank class. A classified image has prediction, label,
    confidence, top5 ([[class, p], ...]) and degraded; a failed one has error and error_kind (``unreadable`` or
    ``site``). A degraded one adds degraded_sites (the sites it lacked) and degraded_at (UTC, ISO 8601); a
    correction (the image re-scored once those sites were back, :mod:`moevit.coordinator.corrections`) has
    revision (1, 2, ...) and corrects (the classification it replaces)."""

    file: str
    model: str
    prediction: int | None = None
    label: str | None = None
    confidence: float | None = None
    top5: list[list[Any]] | None = None
    degraded: bool | None = None
    true: int | None = None
    error: str | None = None
    error_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    blank: bool | None = None
    degraded_sites: list[str] | None = None
    degraded_at: str | None = None
    revision: int | None = None
    corrects: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k in RECORD_KEYS if (v := getattr(self, k)) is not None}
        out.update(self.extra)
        if self.blank is not None:
            out["blank"] = self.blank
        return out

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> ImageRecord:
        known = {k: rec[k] for k in (*RECORD_KEYS, "blank") if k in rec}
        return cls(**known, extra={k: v for k, v in rec.items() if k not in known})


def round_p(p: float) -> float:
    return round(float(p), DECIMALS)


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


# ------------------------------------------------------------------------------------------------------ taxa


def read_taxa(path: str | Path) -> list[Taxon]:
    """An SSW60-style ``taxa.csv`` (``label,common_name,scientific_name``; a folder holding one works too)."""
    p = Path(path)
    if p.is_dir():
        p = p / "taxa.csv"
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise FileNotFoundError(f"--taxa {path}: no such file") from None
    missing = [c for c in SSW60_TAXA_COLUMNS if c not in columns]
    if missing:
        raise ResultsError(f"{p}: missing column(s) {', '.join(missing)} (expected {', '.join(SSW60_TAXA_COLUMNS)})")
    return [Taxon(i, r["label"].strip(), r["common_name"].strip(), r["scientific_name"].strip())
            for i, r in enumerate(rows)]


def descriptions_for(labels: Sequence[str], taxa: Sequence[Taxon] | None) -> dict[str, str]:
    """``classification_category_descriptions``: class id -> scientific name, for classes a taxon names (by common
    name, scientific name or label, case-insensitive). Empty when no class is known; otherwise every class id is
    present (the format wants the same ids as ``classification_categories``), unknown ones with their class name."""
    if not taxa:
        return {}
    index: dict[str, Taxon] = {}
    for t in taxa:
        for key in (t.common_name, t.scientific_name, t.label):
            if key:
                index.setdefault(key.casefold(), t)
    found = {i: index[name.casefold()].scientific_name for i, name in enumerate(labels)
             if name.casefold() in index and index[name.casefold()].scientific_name}
    if not found:
        return {}
    return {str(i): found.get(i, name) for i, name in enumerate(labels)}


# ---------------------------------------------------------------------------------------------------- the log


class ResultLog:
    """Append-only JSON-lines file: :meth:`append` writes a batch of records in one ``write`` and ``fsync``s."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # a line cut short by a crash must not glue onto the next record
        if self.path.stat().st_size and not _ends_with_newline(self.path):
            os.write(self._fd, b"\n")

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        assert self._fd is not None, "log closed"
        # strict JSON: a NaN or an Infinity is refused here rather than written as a line no JSON reader takes
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError as e:  # a full disk: say which file (a cut line is skipped when the run resumes)
            raise OSError(e.errno, f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LOCK_SUFFIX = ".lock"


class OutputLock:
    """``<out>.lock``, held (``flock``) by the run writing ``out`` for as long as it runs: a second run with the same
    ``--out`` is refused instead of both writing the same files. The kernel drops the lock when the process dies
    (kill -9 included), so a stale lock file never blocks anything; :meth:`release` removes the file."""

    def __init__(self, out: str | Path) -> None:
        import fcntl

        out = Path(out)
        self.path = out.with_name(out.name + LOCK_SUFFIX)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise ResultsError(f"{out} is being written by another run (pid {holder}, lock {self.path}); wait "
                                   "for it to finish, or give another --out") from None
            # the holder before us may have removed the file between our open and our lock: lock the file there now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then locks a fresh file
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines file and the number of lines skipped (cut short by a crash, or not a record)."""
    records, skipped = [], 0
    with Path(path).open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                skipped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


def fingerprint_of(doc: Mapping[str, Any]) -> str | None:
    """The model fingerprint of a MegaDetector results document written by moevit (None for other tools')."""
    info = doc.get("info") if isinstance(doc, Mapping) else None
    meta = info.get("classifier_metadata") if isinstance(info, Mapping) else None
    if isinstance(meta, Mapping) and isinstance(meta.get("version"), str):
        return meta["version"]
    return None


def records_from_megadetector(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-image records back from a moevit MegaDetector document (probabilities as rounded there)."""
    fp = fingerprint_of(doc)
    if fp is None:
        raise ResultsError("not a moevit results file (info.classifier_metadata.version, the model fingerprint, "
                           "is missing)")
    cats = doc.get("classification_categories") or {}
    out = []
    for im in doc.get("images", []):
        rec = ImageRecord(im["file"], fp)
        if im.get("failure"):
            rec.error, rec.error_kind = im["failure"], im.get("moevit_failure_kind", "unreadable")
        else:
            dets = im.get("detections")
            cls = (dets[0].get("classifications") if dets else im.get("moevit_classifications")) or []
            if not cls:
                raise ResultsError(f"image {im['file']}: no classifications")
            pred = int(cls[0][0])
            rec.prediction, rec.label, rec.confidence = pred, cats.get(cls[0][0], str(pred)), float(cls[0][1])
            rec.top5 = [[int(c), float(p)] for c, p in cls]
            rec.degraded = bool(im.get("moevit_degraded", False))
            if "moevit_blank" in im:
                rec.blank = bool(im["moevit_blank"])
            if "moevit_true" in im:
                rec.true = im["moevit_true"]
            for key in CORRECTION_KEYS:
                if f"moevit_{key}" in im:
                    setattr(rec, key, im[f"moevit_{key}"])
        for key in ("datetime", "time_source", "time_flags", "exif_datetime", "camera"):
            src = key if key == "datetime" else f"moevit_{key}"
            if src in im:
                rec.extra[key] = im[src]
        out.append(rec.to_json())
    return out


def _done(rec: Mapping[str, Any]) -> bool:
    """Finished for good: classified, or failed in a way a retry will not fix."""
    return "error" not in rec or rec.get("error_kind", "unreadable") == "unreadable"


def load_previous(out: str | Path, fingerprint: str, *, restart: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, Any]]:
    """Records of earlier runs with the same ``--out`` (file -> last record), checked to be of ``fingerprint``.

    Sources: the finished MegaDetector file (if any) and its ``.partial.jsonl`` log. ``restart`` discards them (the
    log is removed now; a finished file is replaced when the new run ends). A ``.jsonl`` output is not resumed:
    every run rewrites it, so this returns nothing for one.
    """
    out = Path(out)
    if is_jsonl(out):
        return {}
    sources: list[tuple[Path, list[dict[str, Any]]]] = []
    logs = [partial_path(out)]
    if restart:
        for p in logs:
            if p.exists():
                p.unlink()
                log(f"--restart: removed {p}")
        return {}
    if out.exists():
        try:
            doc = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ResultsError(f"{out} exists but is not a readable results file ({e}); move it away or pass "
                               "--restart to overwrite it") from None
        if not isinstance(doc, dict) or fingerprint_of(doc) is None:
            raise ResultsError(f"{out} exists and is not moevit MegaDetector output; move it away or pass "
                               "--restart to overwrite it")
        sources.append((out, records_from_megadetector(doc)))
    for p in logs:
        if p.exists():
            records, skipped = read_jsonl(p)
            if skipped:
                log(f"{p}: skipped {skipped} incomplete line(s) (a run cut short)")
            sources.append((p, records))
    done: dict[str, dict[str, Any]] = {}
    for path, records in sources:
        others = sorted({str(r.get("model") or "(unknown: no 'model' field)") for r in records} - {fingerprint})
        if others:
            n = sum(1 for r in records if r.get("model") != fingerprint)
            raise ResultsError(
                f"{path} holds results of model {', '.join(others)} ({n} images) but this run uses model "
                f"{fingerprint}: results of two model versions cannot be mixed. Use another --out, or pass "
                "--restart to discard the old results")
        done.update((r["file"], r) for r in records if _done(r))
    return done


# ---------------------------------------------------------------------------------------- MegaDetector output


def sequence_group(rec: Mapping[str, Any]) -> str:
    """Default sequence group of a record: its folder (``root`` for the top level), plus the camera serial."""
    parent = PurePosixPath(rec["file"]).parent.as_posix()
    group = "root" if parent in (".", "") else parent
    serial = (rec.get("camera") or {}).get("serial")
    return f"{group}@{serial}" if serial else group


def _classifications(rec: Mapping[str, Any]) -> list[list[Any]]:
    pairs = sorted(((int(c), round_p(p)) for c, p in rec["top5"]), key=lambda cp: (-cp[1], cp[0]))[:TOP_K]
    return [[str(c), p] for c, p in pairs]


# MegaDetector's categories for the classes that are not animals, when a model's labels name them
_NON_ANIMAL = {"2": (HUMAN, "person"), "3": (VEHICLE, "vehicle")}
_CATEGORY = {HUMAN: "2", VEHICLE: "3"}


def _detection(cls: list[list[Any]], kinds: Mapping[int, str], blank_class: int | None) -> dict[str, Any]:
    """The whole-image detection of a classified, non-blank image."""
    shown = [c for c, _ in cls if kinds.get(int(c)) != BLANK]
    category = _CATEGORY.get(kinds.get(int(shown[0]), ""), "1") if shown else "1"
    if blank_class is None:
        conf = cls[0][1]
    else:
        conf = round_p(1.0 - next((p for c, p in cls if int(c) == blank_class), 0.0))
    return {"category": category, "conf": conf, "bbox": list(WHOLE_IMAGE), "classifications": cls}


def build_megadetector(records: Sequence[Mapping[str, Any]], *, labels: Sequence[str], fingerprint: str,
                       classifier: str | None = None, classifier_metadata: Mapping[str, Any] | None = None,
                       descriptions: Mapping[str, str] | None = None, gap_s: float = DEFAULT_SEQUENCE_GAP_S,
                       completed: datetime | None = None, extra_info: Mapping[str, Any] | None = None,
                       group: Callable[[Mapping[str, Any]], str] = sequence_group) -> dict[str, Any]:
    """The MegaDetector batch-output document (format 1.6) of ``records``, in their order.

    A whole-image classifier has no detector: each classified image gets one detection with bbox
    ``[0, 0, 1, 1]`` and the top-5 ``classifications``: category ``"1"`` (animal), or ``"2"`` (person) / ``"3"``
    (vehicle) when its top non-blank class is a person or vehicle class; ``conf`` = the top-1 probability, or
    1 - P(blank) for a model with a blank class. An image the blank filter found empty (``blank`` in its record)
    has ``detections: []``, its classifications kept in ``moevit_classifications``.
    Classified images with a capture time are grouped into sequences (``seq_id``, ``seq_num_frames``,
    ``frame_num``); ``moevit_sequence_classification`` is the confidence-weighted majority label of the
    sequence's non-blank frames (of all its frames when every one is blank).
    """
    completed = completed or datetime.now().astimezone()
    names = [str(x) if str(x).strip() else f"class{i}" for i, x in enumerate(labels)]
    kinds = class_kinds(names)
    blank_class = next((i for i, k in kinds.items() if k == BLANK), None)
    ok = [r for r in records if "error" not in r]
    frames = assign_sequences(((r["file"], *sequence_position(r, group(r))) for r in ok), gap_s)
    seq_members: dict[str, list[Mapping[str, Any]]] = {}
    for r in ok:
        seq_members.setdefault(frames[r["file"]].seq_id, []).append(r)
    seq_labels = {s: sequence_label([[(int(c), round_p(p)) for c, p in m["top5"]]
                                     for m in ([m for m in members if not m.get("blank")] or members)])
                  for s, members in seq_members.items()}
    images = []
    for r in records:
        im: dict[str, Any] = {"file": r["file"]}
        if "error" in r:
            im["failure"] = str(r["error"])
            im["detections"] = None
            im["moevit_failure_kind"] = r.get("error_kind", "unreadable")
        else:
            cls = _classifications(r)
            if r.get("blank"):
                im["detections"] = []
                im["moevit_classifications"] = cls
            else:
                im["detections"] = [_detection(cls, kinds, blank_class)]
            if "blank" in r:
                im["moevit_blank"] = bool(r["blank"])
            fr = frames[r["file"]]
            im.update(seq_id=fr.seq_id, seq_num_frames=fr.seq_num_frames, frame_num=fr.frame_num)
            label = seq_labels[fr.seq_id]
            if label is not None:
                im["moevit_sequence_classification"] = [str(label[0]), round_p(label[1])]
            im["moevit_degraded"] = bool(r.get("degraded", False))
            for key in CORRECTION_KEYS:  # what the fallback lacked, and a re-scored image's revision and original
                if key in r:
                    im[f"moevit_{key}"] = r[key]
            if "true" in r:
                im["moevit_true"] = r["true"]
        if "datetime" in r:
            im["datetime"] = r["datetime"]
        for key in ("time_source", "time_flags", "exif_datetime", "camera"):
            if key in r:
                im[f"moevit_{key}"] = r[key]
        images.append(im)
    meta = {"name": "moevit", "version": fingerprint, **(classifier_metadata or {})}
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "detector": DETECTOR,
        "detector_metadata": {"whole_image_classifier": True, "typical_detection_threshold": 0.0,
                              "conservative_detection_threshold": 0.0},
        "classifier": classifier or f"moevit {fingerprint}",
        "classification_completion_time": completed.strftime("%Y-%m-%d %H:%M:%S"),
        "classifier_metadata": meta,
        "moevit_completion_time": completed.isoformat(timespec="seconds"),
        "moevit_sequence_gap_s": float(gap_s),
        **(extra_info or {}),
    }
    categories = {**DETECTION_CATEGORIES, **{c: n for c, (kind, n) in _NON_ANIMAL.items() if kind in kinds.values()}}
    doc: dict[str, Any] = {"info": info, "detection_categories": categories,
                           "classification_categories": {str(i): n for i, n in enumerate(names)}}
    if descriptions:
        doc["classification_category_descriptions"] = {k: str(descriptions[k]) for k in sorted(descriptions, key=int)}
    doc["images"] = images
    return doc


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is always either the old file or the complete new one (durable: results
    must survive a power cut at a field station)."""
    atomic_write(path, data, durable=True)


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON so that ``path`` is always either the old file or the complete new one."""
    write_bytes_atomic(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
