"""Event summaries: one per sequence, top-3 with calibrated probabilities, JSON and a 30-byte binary form that a
decoder reads back (round trip), deterministic message ids."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from moevit.coordinator import results as res
from moevit.coordinator.events import (
    BINARY_SIZE,
    EventSummary,
    camera_hash,
    decode_event,
    events_from_megadetector,
)

LABELS = ("blank", "red fox", "jackal", "person")


def _rec(file, t, top, blank=None, degraded=False):
    r = {"file": file, "model": "0123456789abcdef", "prediction": top[0][0], "label": LABELS[top[0][0]],
         "confidence": top[0][1], "top5": [list(p) for p in top], "degraded": degraded, "datetime": t,
         "time_source": "exif:DateTimeOriginal", "time_flags": [], "camera": {"serial": "S9"}}
    if blank is not None:
        r["blank"] = blank
    return r


def _doc():
    recs = [
        # burst 1: an empty frame, then two fox frames (one unsure), one degraded
        _rec("cam/1.jpg", "2024-05-01T06:00:00+02:00", [(0, 0.9), (1, 0.06), (2, 0.04)], blank=True),
        _rec("cam/2.jpg", "2024-05-01T06:00:02+02:00", [(1, 0.6), (2, 0.3), (0, 0.1)], blank=False),
        _rec("cam/3.jpg", "2024-05-01T06:00:04+02:00", [(2, 0.5), (1, 0.4), (0, 0.1)], blank=False,
             degraded=True),
        # burst 2: two empty triggers
        _rec("cam/4.jpg", "2024-05-01T09:00:00+02:00", [(0, 0.95), (3, 0.05)], blank=True),
        _rec("cam/5.jpg", "2024-05-01T09:00:01+02:00", [(0, 0.85), (1, 0.15)], blank=True),
    ]
    return res.build_megadetector(recs, labels=LABELS, fingerprint="0123456789abcdef")


def test_one_summary_per_sequence_with_top3_of_its_non_blank_frames():
    e1, e2 = events_from_megadetector(_doc(), deployment_of={"cam@S9": "cam-2024"})
    assert (e1.event_id, e1.camera, e1.deployment, e1.frames) == ("cam@S9-seq0001", "cam@S9", "cam-2024", 3)
    # mean over the two non-blank frames: fox (0.6+0.4)/2, jackal (0.3+0.5)/2; blank is not ranked
    assert [c for c, _ in e1.top] == [1, 2] and [p for _, p in e1.top] == pytest.approx([0.5, 0.4])
    assert not e1.blank and e1.degraded and e1.span_s == 4
    assert e1.start == datetime(2024, 5, 1, 6, tzinfo=timezone(timedelta(hours=2)))
    assert e2.blank and not e2.degraded and [c for c, _ in e2.top] == [0, 1, 3]
    assert [p for _, p in e2.top] == pytest.approx([0.9, 0.075, 0.025])
    js = e1.to_json(labels={"1": "red fox", "2": "jackal"})
    assert js["top"][0] == {"class": 1, "p": 0.5, "label": "red fox"} and js["id"] == e1.message_id


def test_binary_form_fits_one_lorawan_uplink_and_decodes():
    assert BINARY_SIZE == 30 <= 51
    for e in events_from_megadetector(_doc(), deployment_of={"cam@S9": "cam-2024"}):
        data = e.to_bytes()
        assert len(data) == BINARY_SIZE
        d = decode_event(data)
        assert d["model"] == "01234567" and d["number"] == e.number and d["frames"] == e.frames
        assert d["start"] == e.start and d["span_s"] == e.span_s
        assert (d["blank"], d["degraded"]) == (e.blank, e.degraded)
        assert d["camera_crc16"] == camera_hash("cam@S9") and d["deployment_crc16"] == camera_hash("cam-2024")
        assert [c for c, _ in d["top"]] == [c for c, _ in e.top]
        for (_, p), (_, q) in zip(d["top"], e.top, strict=True):
            assert abs(p - q) <= 1 / 510 + 1e-12


def test_binary_edge_cases():
    naive = EventSummary("x-seq0042", "x", None, "ffffffffffffffff", datetime(2024, 1, 1, 12), None, 300,
                         ((65534, 1.0),), False, False, 7)
    d = decode_event(naive.to_bytes())
    assert d["start"] == datetime(2024, 1, 1, 12) and d["frames"] == 255 and d["revision"] == 7
    assert d["number"] == 42 and d["top"] == [(65534, 1.0)]
    untimed = EventSummary("y", "y", None, "00", None, None, 1, (), True, True)
    d = decode_event(untimed.to_bytes())
    assert d["start"] is None and d["top"] == [] and d["blank"] and d["degraded"]
    with pytest.raises(ValueError, match="30 bytes"):
        decode_event(b"\x10" * 29)
    with pytest.raises(ValueError, match="version 2"):
        decode_event(b"\x20" + naive.to_bytes()[1:])


def test_message_ids_are_deterministic_and_revisions_differ():
    a = events_from_megadetector(_doc())
    b = events_from_megadetector(_doc())
    assert [e.message_id for e in a] == [e.message_id for e in b]
    assert len({e.message_id for e in a}) == len(a)
    from dataclasses import replace

    assert replace(a[0], revision=1).message_id != a[0].message_id
