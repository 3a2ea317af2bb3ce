"""MegaDetector batch output (format 1.6), EXIF time and sequences, and resumable runs.

The format rules are written out in :func:`check_megadetector` from the format's documentation
(https://lila.science/megadetector-output-format, "MegaDetector output format", and the checks of its reference
validator ``megadetector/postprocessing/validate_batch_results.py``); every output is checked against all of them.

End to end: a real ``python -m moevit.coordinator.cli`` run over a folder of small JPEGs the test writes (two bursts
with EXIF times, visually different, plus an image without EXIF, one with a 1999 clock and a corrupt one) against two
real worker processes; then the same run killed with SIGKILL mid-way and started again must give the same file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml
from moevit.coordinator import fieldmeta
from moevit.coordinator import results as res
from PIL import Image

from moevit.checkpoint import save_checkpoint
from moevit.data import Taxon, load_image
from tests.deploy import small_moe_model
from tests.netutil import free_port, stop, wait_serving

LABELS = ("Northern Cardinal", "Blue Jay", "American Robin")
SCIENTIFIC = {"Northern Cardinal": "Cardinalis cardinalis", "Blue Jay": "Cyanocitta cristata",
              "American Robin": "Turdus migratorius"}
SIZE = 64
BURST = 30  # frames per burst


# ------------------------------------------------------------------------------------- the format's rules

_CLASSIFICATION_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\Z")
_VIDEO = (".mp4", ".avi", ".mov", ".mkv", ".wmv", ".asf", ".mpg", ".mpeg")


def _int_id(k: object) -> int:
    assert isinstance(k, str), f"category id {k!r} must be a string"
    assert re.fullmatch(r"\d+", k), f"category id {k!r} must be a string-formatted non-negative int"
    return int(k)


def check_megadetector(doc: dict, *, whole_image: bool = True) -> None:
    """Every rule of the MegaDetector output format (1.x, as of 1.6) that applies to image results."""
    # The file is a JSON object; "info", "detection_categories" and "images" are required; the only other
    # standard top-level keys are "classification_categories" and "classification_category_descriptions"
    # (the reference validator warns about any other key, so we write none).
    assert isinstance(doc, dict)
    assert {"info", "detection_categories", "images"} <= set(doc)
    assert set(doc) <= {"info", "detection_categories", "images", "classification_categories",
                        "classification_category_descriptions"}, set(doc)
    # info: an object; format_version is required and must be a string-formatted float (>= 1.3 for the validator).
    info = doc["info"]
    assert isinstance(info, dict)
    assert isinstance(info["format_version"], str) and float(info["format_version"]) >= 1.3
    assert info["format_version"] == "1.6"
    # The other info fields are optional; the ones we write have the documented types/shapes.
    for key in ("detector", "classifier"):
        assert isinstance(info.get(key), str) and info[key]
    assert _CLASSIFICATION_TIME.match(info["classification_completion_time"])
    for key in ("detector_metadata", "classifier_metadata"):
        assert isinstance(info.get(key, {}), dict)
    # detection_categories: required; ids are string-formatted non-negative ints; names are non-blank strings;
    # the id "0" is discouraged (informally reserved for "empty"); "animal" is the recommended name.
    dc = doc["detection_categories"]
    assert isinstance(dc, dict) and dc
    for k, v in dc.items():
        _int_id(k)
        assert k != "0"
        assert isinstance(v, str) and v.strip()
    assert "animal" in dc.values()
    # classification_categories: optional; same id rule; names non-blank strings.
    cc = doc.get("classification_categories", {})
    assert isinstance(cc, dict)
    for k, v in cc.items():
        _int_id(k)
        assert isinstance(v, str) and v.strip()
    # classification_category_descriptions: optional; if present, string ids, exactly the ids of
    # classification_categories, string values.
    if "classification_category_descriptions" in doc:
        ccd = doc["classification_category_descriptions"]
        assert isinstance(ccd, dict) and set(ccd) == set(cc)
        assert all(isinstance(v, str) for v in ccd.values())
    # images: required list (may be empty) of objects, each with a "file" string.
    images = doc["images"]
    assert isinstance(images, list)
    files = [im["file"] for im in images]
    assert len(set(files)) == len(files), "each file once"
    for im in images:
        assert isinstance(im, dict) and isinstance(im.get("file"), str) and im["file"]
        # paths are typically relative; forward slashes are preferred
        assert "\\" not in im["file"] and not im["file"].startswith("/")
        # videos need frame_rate and per-detection frame_number (we write images only)
        assert not im["file"].lower().endswith(_VIDEO)
        failure = im.get("failure")
        if failure is not None:
            # a failed file: "failure" is a string; "detections" null or omitted, never an empty list
            assert isinstance(failure, str) and failure
            assert im.get("detections") is None
            continue
        # a processed file: "detections" is present and a list (no detections -> [], not omitted)
        assert isinstance(im.get("detections"), list)
        for det in im["detections"]:
            # category: a string id mapped in detection_categories; conf: a float in [0, 1]
            assert isinstance(det["category"], str) and det["category"] in dc
            assert isinstance(det["conf"], float) and 0.0 <= det["conf"] <= 1.0
            # bbox: [x_min, y_min, width, height], normalised to the image (origin top-left)
            box = det["bbox"]
            assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            x, y, w, h = box
            assert 0 <= x <= 1 and 0 <= y <= 1 and 0 <= w <= 1 and 0 <= h <= 1
            assert x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
            # classifications: optional list of [category_id_string, conf] pairs, ids in
            # classification_categories, listed in descending order of confidence
            cls = det.get("classifications")
            if cls is not None:
                assert isinstance(cls, list)
                for pair in cls:
                    assert isinstance(pair, list) and len(pair) == 2
                    assert isinstance(pair[0], str) and pair[0] in cc
                    _int_id(pair[0])
                    assert isinstance(pair[1], (int, float)) and 0.0 <= pair[1] <= 1.0
                confs = [c for _, c in cls]
                assert confs == sorted(confs, reverse=True)
        if whole_image:
            # ours: one whole-image "animal" detection whose conf is the top-1 probability, top 5 classes
            assert len(im["detections"]) == 1
            det = im["detections"][0]
            assert det["bbox"] == [0.0, 0.0, 1.0, 1.0] and dc[det["category"]] == "animal"
            assert 1 <= len(det["classifications"]) <= 5 and det["conf"] == det["classifications"][0][1]
            assert len({c for c, _ in det["classifications"]}) == len(det["classifications"])
            # our additions, ignorable by readers: degraded flag; sequence fields
            assert isinstance(im["moevit_degraded"], bool)
            assert isinstance(im["seq_id"], str) and 0 <= im["frame_num"] < im["seq_num_frames"]


# ------------------------------------------------------------------------------------------------- unit


def _records():
    def ok(file, t, top, degraded=False, serial=None):
        rec = {"file": file, "model": "fp", "prediction": top[0][0], "label": LABELS[top[0][0]],
               "confidence": top[0][1], "top5": [list(p) for p in top], "degraded": degraded, "datetime": t,
               "time_source": "exif:DateTimeOriginal", "time_flags": []}
        if serial:
            rec["camera"] = {"serial": serial}
        return rec

    return [
        ok("a/1.jpg", "2024-05-01T06:00:00", [(0, 0.5), (1, 0.3), (2, 0.2)]),
        ok("a/2.jpg", "2024-05-01T06:00:40", [(1, 0.45), (0, 0.35), (2, 0.2)], degraded=True),
        ok("a/3.jpg", "2024-05-01T06:01:40", [(1, 0.45), (0, 0.35), (2, 0.2)]),  # 60 s after 2: same sequence
        ok("a/4.jpg", "2024-05-01T06:02:41", [(2, 0.9), (0, 0.05), (1, 0.05)]),  # 61 s after 3: a new one
        {"file": "a/bad.jpg", "model": "fp", "error": "unreadable image: x", "error_kind": "unreadable",
         "datetime": "2024-05-01T06:00:05+00:00", "time_source": "file:mtime", "time_flags": ["no_exif_time"]},
    ]


def test_typed_records_serialise_to_todays_record_json():
    """ImageRecord.to_json is the record format (a line of a .jsonl output and of the run log): the keys in the order
    moe-coordinator has always written them; from_json then to_json gives back the same line."""
    for r in _records():
        line = json.dumps(r, separators=(",", ":"))
        assert json.dumps(res.ImageRecord.from_json(json.loads(line)).to_json(), separators=(",", ":")) == line
    rec = res.ImageRecord("cam01/IMG_0001.JPG", "abc", prediction=2, label="Blue Jay", confidence=0.91,
                          top5=[[2, 0.91], [0, 0.05]], degraded=False, true=0,
                          extra={"datetime": "2024-05-01T06:00:00", "time_source": "exif:DateTimeOriginal",
                                 "time_flags": [], "camera": {"serial": "S1"}}, blank=False)
    assert json.dumps(rec.to_json(), separators=(",", ":")) == (
        '{"file":"cam01/IMG_0001.JPG","model":"abc","prediction":2,"label":"Blue Jay","confidence":0.91,'
        '"top5":[[2,0.91],[0,0.05]],"degraded":false,"true":0,"datetime":"2024-05-01T06:00:00",'
        '"time_source":"exif:DateTimeOriginal","time_flags":[],"camera":{"serial":"S1"},"blank":false}')
    failed = res.ImageRecord("b.jpg", "abc", error="unreadable image: x", error_kind="unreadable")
    assert list(failed.to_json()) == ["file", "model", "error", "error_kind"]


def test_build_megadetector_follows_the_format():
    doc = res.build_megadetector(_records(), labels=LABELS, fingerprint="fp",
                                 descriptions=res.descriptions_for(LABELS, [Taxon(0, "0", "Blue Jay", "Cyanocitta "
                                                                                  "cristata")]))
    check_megadetector(doc)
    assert doc["classification_category_descriptions"] == {"0": "Northern Cardinal", "1": "Cyanocitta cristata",
                                                           "2": "American Robin"}
    ims = {im["file"]: im for im in doc["images"]}
    assert ims["a/bad.jpg"]["detections"] is None and "unreadable" in ims["a/bad.jpg"]["failure"]
    assert ims["a/2.jpg"]["moevit_degraded"] and not ims["a/1.jpg"]["moevit_degraded"]
    # sequences: 1-2-3 (gaps 40 s and exactly 60 s), then 4 (61 s)
    assert [ims[f"a/{i}.jpg"]["seq_id"] for i in range(1, 5)] == ["a-seq0001"] * 3 + ["a-seq0002"]
    assert [ims[f"a/{i}.jpg"]["frame_num"] for i in range(1, 4)] == [0, 1, 2]
    assert ims["a/1.jpg"]["seq_num_frames"] == 3 and ims["a/4.jpg"]["seq_num_frames"] == 1
    # weighted majority: class 1 has 2 votes of 0.45 (0.9) > class 0's single 0.5
    assert ims["a/1.jpg"]["moevit_sequence_classification"] == ["1", round((0.3 + 0.45 + 0.45) / 3, 4)]
    # round trip: records rebuilt from the document give the same document
    again = res.build_megadetector(res.records_from_megadetector(doc), labels=LABELS, fingerprint="fp",
                                   descriptions=doc["classification_category_descriptions"],
                                   completed=datetime.now().astimezone())
    for d in (doc, again):
        for k in ("classification_completion_time", "moevit_completion_time"):
            d["info"].pop(k)
    assert again == doc


def test_sequence_label_is_confidence_weighted():
    # three weak votes for 0 lose to two strong votes for 2
    frames = [[(0, 0.4), (2, 0.35)]] * 3 + [[(2, 0.95), (0, 0.05)]] * 2
    label, p = fieldmeta.sequence_label(frames)
    assert label == 2 and p == pytest.approx((3 * 0.35 + 2 * 0.95) / 5)
    assert fieldmeta.sequence_label([[(1, 0.5)], [(0, 0.5)]])[0] == 0  # a tie goes to the smaller class index
    assert fieldmeta.sequence_label([]) is None


def test_sequences_per_group_and_untimed_singletons():
    t0 = datetime(2024, 5, 1, 6)
    seqs = fieldmeta.assign_sequences([("x1", "cam1", t0), ("y1", "cam2", t0 + timedelta(seconds=5)),
                                       ("x2", "cam1", t0 + timedelta(seconds=30)), ("x0", "cam1", None)], gap_s=60)
    assert seqs["x1"].seq_id == seqs["x2"].seq_id == "cam1-seq0001" and seqs["x2"].frame_num == 1
    assert seqs["y1"].seq_id == "cam2-seq0001"
    assert seqs["x0"].seq_id == "cam1-seq0002" and seqs["x0"].seq_num_frames == 1
    with pytest.raises(ValueError, match="gap"):
        fieldmeta.assign_sequences([], gap_s=-1)


def _jpeg(path: Path, exif: Image.Exif | None = None, colour=(120, 80, 40)) -> Path:
    im = Image.new("RGB", (48, 36), colour)
    if exif is None:
        im.save(path)
    else:
        im.save(path, exif=exif)
    return path


def _exif(original: str | None = None, *, datetime_tag: str | None = None, offset: str | None = None,
          make="RECONYX", model="HF2X", serial="H500-123") -> Image.Exif:
    exif = Image.Exif()
    exif[fieldmeta.TAG_MAKE], exif[fieldmeta.TAG_MODEL] = make, model
    if datetime_tag:
        exif[fieldmeta.TAG_DATETIME] = datetime_tag
    sub = {fieldmeta.TAG_BODY_SERIAL: serial}
    if original:
        sub[fieldmeta.TAG_DATETIME_ORIGINAL] = original
    if offset:
        sub[fieldmeta.TAG_OFFSET_TIME_ORIGINAL] = offset
    exif[fieldmeta.EXIF_IFD] = sub
    return exif


def test_exif_time_camera_and_untrusted_clocks(tmp_path):
    m = fieldmeta.read_image_meta(_jpeg(tmp_path / "a.jpg", _exif("2024:05:01 06:00:00")))
    assert (m.datetime, m.time_source, m.time_flags) == ("2024-05-01T06:00:00", "exif:DateTimeOriginal", ())
    assert (m.make, m.model, m.serial) == ("RECONYX", "HF2X", "H500-123")
    m = fieldmeta.read_image_meta(_jpeg(tmp_path / "b.jpg", _exif("2024:05:01 06:00:00", offset="+02:00")))
    assert m.datetime == "2024-05-01T06:00:00+02:00"
    m = fieldmeta.read_image_meta(_jpeg(tmp_path / "c.jpg", _exif(datetime_tag="2024:05:02 07:00:00")))
    assert (m.datetime, m.time_source) == ("2024-05-02T07:00:00", "exif:DateTime")
    # no EXIF: the file's modification time, flagged
    p = _jpeg(tmp_path / "d.jpg")
    os.utime(p, (1714543200, 1714543200))
    m = fieldmeta.read_image_meta(p)
    assert m.time_source == "file:mtime" and m.time_flags == ("no_exif_time",) and m.make is None
    assert fieldmeta.parse_iso(m.datetime).timestamp() == 1714543200
    # a clock that reset to its factory date, and one in the future: not trusted, mtime used, flagged
    for name, value, flag in (("e.jpg", "1999:12:31 23:59:59", "clock_before_2000"),
                              ("f.jpg", f"{datetime.now().year + 2}:01:01 00:00:00", "clock_in_future")):
        p = _jpeg(tmp_path / name, _exif(value))
        m = fieldmeta.read_image_meta(p)
        assert m.time_source == "file:mtime" and m.time_flags == (flag,) and m.exif_datetime == value
    m = fieldmeta.read_image_meta(_jpeg(tmp_path / "g.jpg", _exif("0000:00:00 00:00:00")))
    assert m.time_flags == ("exif_time_unparseable",)
    # unreadable file: still a time (mtime), never an exception
    (tmp_path / "h.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert fieldmeta.read_image_meta(tmp_path / "h.jpg").time_source == "file:mtime"


def test_log_survives_a_cut_line_and_refuses_another_model(tmp_path):
    out = tmp_path / "r.json"
    log = res.ResultLog(res.partial_path(out))
    recs = _records()
    log.append(recs[:2])
    log.close()
    with res.partial_path(out).open("ab") as f:  # a crash in the middle of a line
        f.write(b'{"file": "a/3.jpg", "mod')
    messages = []
    done = res.load_previous(out, "fp", log=messages.append)
    assert sorted(done) == ["a/1.jpg", "a/2.jpg"] and "skipped 1 incomplete" in messages[0]
    log = res.ResultLog(res.partial_path(out))  # appending after a cut line starts a fresh line
    log.append([recs[2], {"file": "a/9.jpg", "model": "fp", "error": "site south: UNAVAILABLE", "error_kind": "site"}])
    log.close()
    done = res.load_previous(out, "fp")
    assert sorted(done) == ["a/1.jpg", "a/2.jpg", "a/3.jpg"]  # a site failure is retried, not reused
    with pytest.raises(res.ResultsError, match=r"model fp .* this run uses model other.*--restart"):
        res.load_previous(out, "other")
    assert res.load_previous(out, "other", restart=True) == {} and not res.partial_path(out).exists()


def test_taxa_csv_gives_scientific_names(tmp_path):
    (tmp_path / "taxa.csv").write_text("label,common_name,scientific_name\n"
                                       + "".join(f"{i},{n},{SCIENTIFIC[n]}\n" for i, n in enumerate(LABELS)))
    taxa = res.read_taxa(tmp_path)
    assert res.descriptions_for(LABELS, taxa) == {str(i): SCIENTIFIC[n] for i, n in enumerate(LABELS)}
    assert res.descriptions_for(["fox"], taxa) == {}
    (tmp_path / "bad.csv").write_text("label,name\n1,x\n")
    with pytest.raises(res.ResultsError, match="scientific_name"):
        res.read_taxa(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------- end to end


def _model():
    return small_moe_model(num_classes=3, labels=LABELS, image_size=SIZE, calib_size=SIZE)


PALETTE = [(200, 30, 30), (30, 60, 220), (40, 170, 60), (230, 210, 40), (120, 40, 160), (20, 20, 20),
           (240, 240, 240), (200, 120, 30)]


def _pick_colours(model, tmp: Path) -> tuple[tuple, tuple]:
    """Two colours the model puts in different classes with a clear margin (JPEG round trip included)."""
    scored = []
    for i, c in enumerate(PALETTE):
        x = load_image(_jpeg(tmp / f"probe{i}.jpg", None, c), SIZE)
        with torch.no_grad():
            p = model(x[None]).softmax(1)[0]
        top = p.topk(2)
        scored.append((c, int(top.indices[0]), float(top.values[0] - top.values[1])))
    for a in scored:
        for b in scored:
            if a[1] != b[1] and min(a[2], b[2]) > 0.01:
                return a[0], b[0]
    raise AssertionError(f"no two palette colours get different classes: {scored}")


def _write_images(root: Path, colours) -> None:
    """cam01/: burst 1 (06:00, mostly colour A), burst 2 (09:00, mostly colour B), 2 s apart;
    misc/: an image without EXIF, one with a 1999 clock, a corrupt one."""
    a, b = colours
    cam = root / "cam01"
    cam.mkdir(parents=True)
    for burst, (hour, main, other) in enumerate(((6, a, b), (9, b, a))):
        start = datetime(2024, 5, 1, hour)
        for k in range(BURST):
            t = (start + timedelta(seconds=2 * k)).strftime("%Y:%m:%d %H:%M:%S")
            colour = other if k % 5 == 4 else main  # one frame in five looks like the other burst
            _jpeg(cam / f"burst{burst + 1}_{k:03d}.jpg", _exif(t), colour)
    misc = root / "misc"
    misc.mkdir()
    _jpeg(misc / "noexif.jpg", None, a)
    _jpeg(misc / "clock1999.jpg", _exif("1999:01:01 00:00:00"), b)
    (misc / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")


def _start_workers(model: Path, ports: dict[str, int], *extra: str) -> dict[str, subprocess.Popen]:
    """Worker processes for ``ports`` started together (each takes seconds to import torch)."""
    procs = {n: subprocess.Popen([sys.executable, "-m", "moevit.worker.cli", "--listen", f"127.0.0.1:{p}", "--model",
                                  str(model), "--experts", "all", "--threads", "1", *extra],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
             for n, p in ports.items()}
    try:
        for n, proc in procs.items():
            wait_serving(f"127.0.0.1:{ports[n]}", proc=proc)
    except BaseException:
        for proc in procs.values():
            stop(proc)
        raise
    return procs


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """Model, topology (cam + north + south), two real workers, the image folder, taxa.csv."""
    tmp = tmp_path_factory.mktemp("field")
    model = _model()
    path = save_checkpoint(model, tmp / "moe.safetensors")
    ports = {"cam": free_port(), "north": free_port(), "south": free_port()}
    doc = {"model": str(path), "coordinator": "cam", "fallback": "fail",
           "sites": {n: {"address": f"127.0.0.1:{p}", "device": {"gflops": 5, "memory_mb": 256, "active_w": 3,
                                                                    "idle_w": 1}} for n, p in ports.items()},
           "links": [{"between": ["cam", n], "bandwidth_mbps": 20, "latency_ms": 4} for n in ports if n != "cam"]}
    topo = tmp / "sites.yaml"
    topo.write_text(yaml.safe_dump(doc))
    procs = _start_workers(path, {n: ports[n] for n in ("north", "south")})
    colours = _pick_colours(model, tmp)
    images = tmp / "images"
    _write_images(images, colours)
    taxa = tmp / "taxa.csv"
    taxa.write_text("label,common_name,scientific_name\n"
                    + "".join(f"{i},{n},{SCIENTIFIC[n]}\n" for i, n in enumerate(LABELS)))
    yield {"tmp": tmp, "model": model, "path": path, "topology": topo, "images": images, "taxa": taxa}
    for p in procs.values():
        stop(p)


def _cmd(field, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(field["topology"]), "--images",
            str(field["images"]), "--out", str(out), "--batch-size", "2", "--no-spawn", "--threads", "1",
            "--taxa", str(field["taxa"]), *extra]


@pytest.fixture(scope="module")
def run(field):
    """One uninterrupted run to results.json."""
    out = field["tmp"] / "full" / "results.json"
    r = subprocess.run(_cmd(field, out, "--metrics-port", "127.0.0.1:0"), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", r.stderr)
    return {"out": out, "doc": json.loads(out.read_text()), "stdout": r.stdout}


def _n_images():
    return 2 * BURST + 3


@pytest.mark.e2e
def test_run_writes_megadetector_json(run):
    doc = run["doc"]
    check_megadetector(doc)
    assert not res.partial_path(run["out"]).exists(), "the run log is removed once the JSON is written"
    info = doc["info"]
    assert info["classifier_metadata"]["version"] in info["classifier"]
    assert doc["classification_categories"] == {"0": "Northern Cardinal", "1": "Blue Jay", "2": "American Robin"}
    assert doc["classification_category_descriptions"] == {str(i): SCIENTIFIC[n] for i, n in enumerate(LABELS)}
    ims = {im["file"]: im for im in doc["images"]}
    assert len(ims) == _n_images() and list(ims) == sorted(ims)
    assert ims["misc/corrupt.jpg"]["detections"] is None and "unreadable" in ims["misc/corrupt.jpg"]["failure"]
    assert ims["misc/noexif.jpg"]["moevit_time_flags"] == ["no_exif_time"]
    assert ims["misc/clock1999.jpg"]["moevit_time_flags"] == ["clock_before_2000"]
    assert ims["misc/clock1999.jpg"]["moevit_exif_datetime"] == "1999:01:01 00:00:00"
    first = ims["cam01/burst1_000.jpg"]
    assert first["datetime"] == "2024-05-01T06:00:00" and first["moevit_camera"]["serial"] == "H500-123"
    assert not any(im.get("moevit_degraded") for im in ims.values())
    assert f"{_n_images()} images: {_n_images() - 1} classified (0 degraded), 1 failed" in run["stdout"]


@pytest.mark.e2e
def test_two_bursts_are_two_sequences_with_the_weighted_majority_label(run):
    ims = [im for im in run["doc"]["images"] if im["file"].startswith("cam01/")]
    seqs: dict[str, list[dict]] = {}
    for im in ims:
        seqs.setdefault(im["seq_id"], []).append(im)
    assert len(seqs) == 2
    labels = []
    for burst, (_, members) in enumerate(sorted(seqs.items()), start=1):
        assert {m["file"].split("_")[0] for m in members} == {f"cam01/burst{burst}"}
        assert sorted(m["frame_num"] for m in members) == list(range(BURST))
        assert all(m["seq_num_frames"] == BURST for m in members)
        # independently: sum each frame's top-1 confidence per top-1 class; the largest total wins
        votes: dict[str, float] = {}
        for m in members:
            cid, conf = m["detections"][0]["classifications"][0]
            votes[cid] = votes.get(cid, 0.0) + conf
        expected = max(sorted(votes), key=lambda c: votes[c])
        assert {tuple(m["moevit_sequence_classification"])[0] for m in members} == {expected}
        labels.append(expected)
    assert labels[0] != labels[1], "the visually different bursts get different labels"


def _strip_times(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for k in ("classification_completion_time", "moevit_completion_time"):
        doc["info"].pop(k)
    return doc


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_results(field, run):
    out = field["tmp"] / "killed" / "results.json"
    partial = res.partial_path(out)
    proc = subprocess.Popen(_cmd(field, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    kept, skipped = res.read_jsonl(partial)
    assert 4 <= len(kept) < _n_images() and skipped <= 1  # a write cut by the kill leaves at most one part line
    r = subprocess.run(_cmd(field, out), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {out}: {len(kept)} of {_n_images()} images already done" in r.stderr
    assert f"resumed: {len(kept)} reused from the previous run's results, {_n_images() - len(kept)} classified " \
           "now" in r.stdout
    assert _strip_times(json.loads(out.read_text())) == _strip_times(run["doc"])
    assert not partial.exists()
    # a third run finds everything done in the finished JSON and changes nothing
    r = subprocess.run(_cmd(field, out), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and f"resumed: {_n_images()} reused" in r.stdout
    assert _strip_times(json.loads(out.read_text())) == _strip_times(run["doc"])


@pytest.mark.slow
def test_resume_with_results_of_another_model_is_refused(field, run):
    out = field["tmp"] / "other" / "results.json"
    out.parent.mkdir()
    doc = json.loads(run["out"].read_text())
    doc["info"]["classifier_metadata"]["version"] = "0123456789abcdef"
    out.write_text(json.dumps(doc))
    r = subprocess.run(_cmd(field, out), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2
    assert "holds results of model 0123456789abcdef" in r.stderr and "--restart" in r.stderr
    assert json.loads(out.read_text()) == doc, "the other model's results are left alone"
    # (--restart discarding them: test_log_survives_a_cut_line_and_refuses_another_model)


@pytest.mark.e2e
def test_camtrapdp_export_of_the_run(field, run, tmp_path):
    from moevit.coordinator.camtrapdp import export_camtrapdp

    from tests.test_camtrapdp import check_package

    deployments = tmp_path / "deployments.yaml"
    deployments.write_text(yaml.safe_dump({
        "project": {"title": "moevit test"}, "contributors": [{"title": "Test", "role": "contact"}],
        "timezone": "+02:00",
        "deployments": {"cam01-2024": {"site": "cam", "files": "cam01/", "latitude": 52.7, "longitude": 23.8},
                        "misc-2024": {"files": ["misc/"], "latitude": 52.8, "longitude": 23.9,
                                      "clockReset": {"cameraTime": "1999-01-01T00:00:00",
                                                     "actualTime": "2024-05-02T12:00:00"}}}}))
    warned: list[str] = []
    export_camtrapdp([run["out"]], deployments, tmp_path / "dp", topologies=[field["topology"]], warn=warned.append)
    tables = check_package(tmp_path / "dp")
    # misc/: the reset clock's frame gets its corrected time; the one without EXIF and the corrupt one (file times
    # only) are left out with a warning
    misc = {m["fileName"]: m["timestamp"] for m in tables["media"] if m["deploymentID"] == "misc-2024"}
    assert misc == {"clock1999.jpg": "2024-05-02T12:00:00+02:00"}
    assert any("misc-2024: 2 image(s) left out" in w for w in warned)
    events = [o for o in tables["observations"] if o["observationLevel"] == "event"
              and o["deploymentID"] == "cam01-2024"]
    assert len(events) == 2
    by_seq = {}
    for im in run["doc"]["images"]:
        if im["file"].startswith("cam01/"):
            by_seq[im["datetime"][:13]] = run["doc"]["classification_category_descriptions"][
                im["moevit_sequence_classification"][0]]
    assert [e["scientificName"] for e in sorted(events, key=lambda e: e["eventStart"])] == \
           [by_seq["2024-05-01T06"], by_seq["2024-05-01T09"]]
    assert events[0]["eventStart"] == "2024-05-01T06:00:00+02:00"


@pytest.mark.slow
def test_mqtt_uplink_of_a_run_survives_an_unreachable_broker(field, run, tmp_path):
    """moe-coordinator --mqtt with no broker: the run finishes (classification never waits), the event summaries
    wait in the outbox; the same command again once a mosquitto answers delivers each event summary once."""
    from moevit.coordinator.events import events_from_megadetector

    from tests.test_uplink import MOSQUITTO, Broker, Consumer

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (make test installs it)")
    port = free_port()
    out = tmp_path / "results.json"
    cmd = _cmd(field, out, "--mqtt", f"mqtt://127.0.0.1:{port}/t", "--mqtt-wait", "1")
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    expected = events_from_megadetector(json.loads(out.read_text()))
    assert f"uplink: {len(expected)} event summaries ({len(expected)} new)" in r.stdout
    assert "wait in" in r.stdout and f"{out}.outbox.sqlite" in r.stdout
    broker = Broker(tmp_path, port).start()
    consumer = Consumer(port)
    try:
        time.sleep(0.5)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)  # resumes: nothing to classify
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"uplink: {len(expected)} event summaries (0 new)" in r.stdout
        assert "every queued message acknowledged" in r.stdout
        got = consumer.wait_for(len(expected))
        assert got == {e.message_id for e in expected}
    finally:
        consumer.close()
        broker.stop()
