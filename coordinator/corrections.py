"""Re-scoring degraded results: when the sites a degraded image lacked are back, the image is classified again
through the full split path, and the correction is written to the results and published.

A record is *degraded* when a fallback computed part of it (docs/reliability.md); it names the sites whose experts
it lacked (``degraded_sites``) and when it was made (``degraded_at``, UTC). The batch run keeps its degraded images
in a bounded :class:`RescoreQueue`. Between batches and at the end of the run, the images whose sites' health
watches say SERVING again are classified again. An image that is no longer degraded becomes a correction
(:func:`correct`): the new classification, ``revision`` one higher, and ``corrects`` holding the classification
it replaces. An image still degraded (a site went down again) waits, retried with a back-off.

The queue has no file of its own. It is rebuilt from the results: the degraded records of the same ``--out`` when
a run resumes. The results log is written (``fsync``) before the outbox, and every run queues again, under the same
ids, the corrections its results hold. So a kill loses no correction and publishes none twice to a consumer that
drops known ids.

Bounds: at most ``limit`` images wait (the oldest leave first) and none older than ``max_age_s``. The others stay
degraded, and the run's summary says how many and why (:func:`summary_lines`).

Messages (:func:`image_key`): a correction's id is ``<key>-img-r<revision>``, where the key hashes the model and
file. A consumer drops duplicates by id and replaces an image's lower revision by the higher one. An event summary
is sent again, as a new revision (:func:`revise_events`), only when a correction changes the event's label (its
top class or its blank flag).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from moevit.coordinator.events import EventSummary, events_from_megadetector
from moevit.coordinator.results import ImageRecord

__all__ = ["CORRECTED_FIELDS", "RescoreQueue", "Waiting", "correct", "image_key", "original_of", "revise_events",
           "summary_lines", "utc_now"]

DEFAULT_LIMIT = 1000
DEFAULT_MAX_AGE_S = 24 * 3600.0
#: the fields of a record a correction replaces; ``corrects`` keeps them as they were
CORRECTED_FIELDS = ("prediction", "label", "confidence", "top5", "degraded", "degraded_sites", "degraded_at",
                    "blank", "strategy", "strategy_policy", "revision")


def utc_now(clock: Callable[[], float] = time.time) -> str:
    """``degraded_at``: the time as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(clock(), timezone.utc).isoformat(timespec="seconds")


def image_key(model: str, file: str) -> str:
    """The image's key in messages: the first 16 hex digits of SHA-256 of ``model|file``."""
    return hashlib.sha256(f"{model}|{file}".encode()).hexdigest()[:16]


def correct(original: Mapping[str, Any], rescored: Mapping[str, Any]) -> dict[str, Any]:
    """The correction of ``original`` (a degraded record) by ``rescored`` (the same image classified again, not
    degraded): ``rescored`` with ``revision`` one higher than the original's and ``corrects``, the original's
    :data:`CORRECTED_FIELDS`."""
    if "error" in rescored or rescored.get("degraded"):
        raise ValueError(f"{rescored.get('file')}: a correction needs a result that is not degraded")
    if rescored.get("file") != original.get("file") or rescored.get("model") != original.get("model"):
        raise ValueError(f"{rescored.get('file')}: corrects another image or model ({original.get('file')}, "
                         f"{original.get('model')})")
    out = {k: v for k, v in rescored.items() if k not in ("revision", "corrects")}
    out["revision"] = int(original.get("revision") or 0) + 1
    out["corrects"] = {k: original[k] for k in CORRECTED_FIELDS if k in original}
    return ImageRecord.from_json(out).to_json()  # the record's key order


def original_of(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record as it was before its latest correction (itself when it is not a correction)."""
    if "corrects" not in rec:
        return rec
    out = {k: v for k, v in rec.items() if k not in CORRECTED_FIELDS and k != "corrects"}
    out.update(rec["corrects"])
    return out


def _label(e: EventSummary) -> tuple[int | None, bool]:
    return (e.top[0][0] if e.top else None, e.blank)


def revise_events(records: Sequence[Mapping[str, Any]], build: Callable[[list[Mapping[str, Any]]], dict[str, Any]],
                  *, deployment: str | None = None) -> list[EventSummary]:
    """The event summaries of ``records``; an event whose label (top class, blank) a correction changed gets the
    highest revision of its frames, so it is published again under a new id. ``build`` makes the MegaDetector
    document of a list of records (the run's labels, fingerprint and sequence gap)."""
    doc = build(list(records))
    events = events_from_megadetector(doc, deployment=deployment)
    revision: dict[str, int] = {}
    for im, r in zip(doc["images"], records, strict=True):
        if im.get("seq_id") is not None and r.get("revision"):
            revision[im["seq_id"]] = max(revision.get(im["seq_id"], 0), int(r["revision"]))
    if not revision:
        return events
    before = {e.event_id: e for e in events_from_megadetector(build([original_of(r) for r in records]),
                                                              deployment=deployment)}
    out = []
    for e in events:
        b = before.get(e.event_id)
        if e.event_id in revision and (b is None or _label(b) != _label(e)):
            e = replace(e, revision=revision[e.event_id])
        out.append(e)
    return out


@dataclass
class Waiting:
    """A degraded image waiting for its sites."""

    file: str
    record: dict[str, Any]  # the degraded record (what a correction replaces)
    since: float  # Unix time it was degraded
    sites: tuple[str, ...]
    tries: int = 0
    next_try: float = 0.0


def _since(rec: Mapping[str, Any], now: float) -> float:
    try:
        t = datetime.fromisoformat(str(rec["degraded_at"]))
    except (KeyError, ValueError):
        return now  # records of older versions carry no time: their age counts from now
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


class RescoreQueue:
    """The degraded images of a run waiting for their sites: at most ``limit`` (the oldest leave first), none older
    than ``max_age_s``; an image re-scored and still degraded waits ``retry_s`` (doubled per try, up to
    ``max_retry_s``) before the next try. ``clock``: Unix seconds (tests pass their own)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, max_age_s: float = DEFAULT_MAX_AGE_S, *,
                 clock: Callable[[], float] = time.time, retry_s: float = 5.0, max_retry_s: float = 300.0) -> None:
        if limit < 0:
            raise ValueError(f"--rescore-limit must be >= 0, got {limit}")
        if not max_age_s >= 0:
            raise ValueError(f"--rescore-max-age must be >= 0 seconds, got {max_age_s}")
        self.limit, self.max_age_s, self.clock = limit, max_age_s, clock
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._waiting: dict[str, Waiting] = {}
        self.corrected: list[str] = []
        self.expired: dict[str, tuple[str, ...]] = {}  # file -> the sites that did not come back in time
        self.overflow: set[str] = set()
        self.gone: dict[str, str] = {}  # file -> why it could not be classified again

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, file: str) -> bool:
        return file in self._waiting

    def add(self, rec: Mapping[str, Any], *, hold: bool = False) -> bool:
        """Queue a degraded record (others are ignored); False when it is too old or does not fit. ``hold``: not
        before ``retry_s`` (an image degraded just now: a link that stalls without the site going down would
        otherwise cost a deadline per try)."""
        if "error" in rec or not rec.get("degraded"):
            return False
        now = self.clock()
        w = Waiting(rec["file"], dict(rec), _since(rec, now), tuple(rec.get("degraded_sites") or ()),
                    next_try=now + self.retry_s if hold else 0.0)
        if now - w.since > self.max_age_s:
            self.expired[w.file] = w.sites
            return False
        self._waiting[w.file] = w
        self.overflow.discard(w.file)
        if len(self._waiting) > self.limit:
            oldest = min(self._waiting.values(), key=lambda x: (x.since, x.file))
            del self._waiting[oldest.file]
            self.overflow.add(oldest.file)
            return oldest is not w
        return True

    def ready(self, is_up: Callable[[str], bool], n: int | None = None) -> list[Waiting]:
        """Up to ``n`` images (oldest first) whose sites are all up and whose back-off is over; images past
        ``max_age_s`` leave the queue first (they stay degraded)."""
        now = self.clock()
        for w in list(self._waiting.values()):
            if now - w.since > self.max_age_s:
                del self._waiting[w.file]
                self.expired[w.file] = w.sites
        out = [w for w in sorted(self._waiting.values(), key=lambda x: (x.since, x.file))
               if w.next_try <= now and all(is_up(s) for s in w.sites)]
        return out if n is None else out[:n]

    def still_degraded(self, file: str, sites: Iterable[str] = ()) -> None:
        """Re-scored and degraded again (or its sites failed meanwhile): wait, then try again."""
        w = self._waiting[file]
        w.tries += 1
        w.next_try = self.clock() + min(self.retry_s * 2 ** (w.tries - 1), self.max_retry_s)
        w.sites = tuple(sorted(set(sites))) or w.sites

    def done(self, file: str) -> None:
        """Corrected: it leaves the queue."""
        del self._waiting[file]
        self.corrected.append(file)

    def give_up(self, file: str, why: str) -> None:
        """It cannot be classified again (the file is gone or unreadable now): it stays degraded."""
        del self._waiting[file]
        self.gone[file] = why

    def waiting_for(self) -> list[str]:
        return sorted({s for w in self._waiting.values() for s in w.sites})

    def report(self) -> dict[str, Any]:
        return {"corrected": len(self.corrected), "waiting": len(self._waiting), "waiting_for": self.waiting_for(),
                "expired": len(self.expired), "expired_sites": sorted({s for v in self.expired.values() for s in v}),
                "overflow": len(self.overflow), "gone": len(self.gone),
                "gone_reasons": sorted(set(self.gone.values()))[:3], "limit": self.limit,
                "max_age_s": self.max_age_s}


def summary_lines(r: Mapping[str, Any]) -> list[str]:
    """The run summary's lines about re-scoring (none when nothing was degraded)."""
    lines = []
    if r["corrected"]:
        lines.append(f"re-scored: {r['corrected']} degraded image(s) classified again once their sites were back; "
                     "the corrections are in the results (revision, corrects)")
    if r["waiting"]:
        lines.append(f"still degraded: {r['waiting']} image(s) wait for site(s) "
                     f"{', '.join(r['waiting_for']) or '(unknown)'}; the same command re-scores them once they are "
                     f"back (for {r['max_age_s']:g} s after they were classified, --rescore-max-age)")
    if r["expired"]:
        lines.append(f"stay degraded: {r['expired']} image(s) whose site(s) "
                     f"{', '.join(r['expired_sites']) or '(unknown)'} did not come back within --rescore-max-age "
                     f"{r['max_age_s']:g} s")
    if r["overflow"]:
        lines.append(f"stay degraded: {r['overflow']} image(s) beyond the re-score queue's limit (--rescore-limit "
                     f"{r['limit']}; the oldest leave first)")
    if r["gone"]:
        lines.append(f"stay degraded: {r['gone']} image(s) that could not be read again: "
                     + "; ".join(r["gone_reasons"]))
    return lines
