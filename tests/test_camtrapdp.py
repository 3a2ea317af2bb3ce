"""Camtrap DP 1.0.2 export: exactly the standard's columns in its order, valid types and constraints (checked here
against the standard's table schemas and profile, written out below independently of the exporter, and by
frictionless against the schemas stored in ../shared/standards/, offline), events from sequences, capture times
only from camera clocks, and clear messages for bad inputs."""

from __future__ import annotations

import copy
import csv
import json
import re
import warnings
from datetime import date, datetime
from pathlib import Path

import pytest
import yaml
from moevit.coordinator import results as res
from moevit.coordinator.camtrapdp import ExportError, export_camtrapdp
from moevit.coordinator.export_cli import main as export_main

from moevit.checkpoint import save_checkpoint
from tests import frictionless_offline

# Camtrap DP 1.0.2 (https://camtrap-dp.tdwg.org/data/; the same fields in 1.0 and 1.0.1): every field of each table
# schema, in order. "required" fields must not be empty.
DEPLOYMENTS = ["deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
               "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay",
               "cameraHeight", "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues",
               "baitUse", "featureType", "habitat", "deploymentGroups", "deploymentTags", "deploymentComments"]
MEDIA = ["mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
         "fileMediatype", "exifData", "favorite", "mediaComments"]
OBSERVATIONS = ["observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
                "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior",
                "individualID", "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX",
                "bboxY", "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy",
                "classificationTimestamp", "classificationProbability", "observationTags", "observationComments"]
REQUIRED = {"deployments": ["deploymentID", "latitude", "longitude", "deploymentStart", "deploymentEnd"],
            "media": ["mediaID", "deploymentID", "timestamp", "filePath", "filePublic", "fileMediatype"],
            "observations": ["observationID", "deploymentID", "eventStart", "eventEnd", "observationLevel",
                             "observationType"]}
ENUMS = {
    ("deployments", "featureType"): {"roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass",
                                     "roadOverpass", "roadBridge", "culvert", "burrow", "nestSite", "carcass",
                                     "waterSource", "fruitingTree"},
    ("media", "captureMethod"): {"activityDetection", "timeLapse"},
    ("observations", "observationLevel"): {"media", "event"},
    ("observations", "observationType"): {"animal", "human", "vehicle", "blank", "unknown", "unclassified"},
    ("observations", "cameraSetupType"): {"setup", "calibration"},
    ("observations", "lifeStage"): {"adult", "subadult", "juvenile"},
    ("observations", "sex"): {"female", "male"},
    ("observations", "classificationMethod"): {"human", "machine"},
}
# (type, minimum, maximum) of the typed fields
TYPES = {
    "deployments": {"latitude": ("number", -90, 90), "longitude": ("number", -180, 180),
                    "coordinateUncertainty": ("integer", 1, None), "deploymentStart": ("datetime",),
                    "deploymentEnd": ("datetime",), "cameraDelay": ("integer", 0, None),
                    "cameraHeight": ("number", 0, None), "cameraDepth": ("number", 0, None),
                    "cameraTilt": ("integer", -90, 90), "cameraHeading": ("integer", 0, 360),
                    "detectionDistance": ("number", 0, None), "timestampIssues": ("boolean",),
                    "baitUse": ("boolean",)},
    "media": {"timestamp": ("datetime",), "filePublic": ("boolean",), "favorite": ("boolean",)},
    "observations": {"eventStart": ("datetime",), "eventEnd": ("datetime",), "count": ("integer", 1, None),
                     "individualPositionRadius": ("number", 0, None),
                     "individualPositionAngle": ("number", -90, 90), "individualSpeed": ("number", 0, None),
                     "bboxX": ("number", 0, 1), "bboxY": ("number", 0, 1), "bboxWidth": ("number", 1e-15, 1),
                     "bboxHeight": ("number", 1e-15, 1), "classificationTimestamp": ("datetime",),
                     "classificationProbability": ("number", 0, 1)},
}
# Table Schema datetime with the Camtrap DP format %Y-%m-%dT%H:%M:%S%z: ISO 8601 with a timezone designator
DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})\Z")
FILE_PATH = re.compile(r"^(?=^[^./~])(^((?!\.{2}).)*$).*$")
MEDIATYPE = re.compile(r"^(image|video|audio)/.*$")
VERSION = "1.0.2"


def _value(table: str, col: str, v: str) -> object:
    spec = TYPES[table].get(col)
    if spec is None or v == "":
        return v
    kind = spec[0]
    if kind == "datetime":
        assert DATETIME.match(v), f"{table}.{col}: {v!r} is not ISO 8601 with a timezone"
        return datetime.strptime(v, "%Y-%m-%dT%H:%M:%S%z")
    if kind == "boolean":
        assert v in ("true", "false"), f"{table}.{col}: {v!r} is not a boolean"
        return v == "true"
    x = float(v)
    if kind == "integer":
        assert re.fullmatch(r"-?\d+", v), f"{table}.{col}: {v!r} is not an integer"
    lo, hi = spec[1], spec[2]
    assert (lo is None or x >= lo) and (hi is None or x <= hi), f"{table}.{col}: {v} out of range"
    return x


def _table(path: Path, table: str, columns: list[str]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        raw = f.read()
    assert not raw.startswith("\ufeff"), "no byte-order mark"
    reader = csv.reader(raw.splitlines())
    header = next(reader)
    assert header == columns, f"{path.name}: columns differ from the standard's"
    rows = [dict(zip(header, r, strict=True)) for r in reader]
    for r in rows:
        for col in REQUIRED[table]:
            assert r[col] != "", f"{table}.{col} is required"
        for (t, col), allowed in ENUMS.items():
            if t == table and r[col]:
                assert r[col] in allowed, f"{table}.{col}: {r[col]!r}"
        for col in columns:
            _value(table, col, r[col])
    return rows


def check_package(folder: Path) -> dict[str, list[dict[str, str]]]:
    """A Camtrap DP 1.0.2 package: the descriptor per the profile, the three tables per their schemas, the keys;
    then frictionless's verdict against the stored schemas (a warning says why where they are absent)."""
    pkg = json.loads((folder / "datapackage.json").read_text(encoding="utf-8"))
    # profile: the URL of the Camtrap DP profile version used
    assert pkg["profile"] == f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/camtrap-dp-profile.json"
    # required: resources, profile, created, contributors, project, spatial, temporal, taxonomic
    for key in ("resources", "profile", "created", "contributors", "project", "spatial", "temporal", "taxonomic"):
        assert key in pkg, key
    names = {r["name"]: r for r in pkg["resources"]}
    assert set(names) == {"deployments", "media", "observations"}
    for name, r in names.items():
        assert r["path"] == f"{name}.csv" and r["profile"] == "tabular-data-resource"
        assert r["schema"] == f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/{name}-table-schema.json"
        assert (folder / r["path"]).is_file()
    if "name" in pkg:  # Data Package: lower-case, url-usable
        assert re.fullmatch(r"[a-z0-9._-]+", pkg["name"])
    assert DATETIME.match(pkg["created"])
    assert isinstance(pkg["contributors"], list) and pkg["contributors"]
    for c in pkg["contributors"]:
        assert c["title"] and c.get("role", "contributor") in {"contact", "principalInvestigator", "rightsHolder",
                                                                  "publisher", "contributor"}
    project = pkg["project"]
    assert isinstance(project["title"], str) and project["title"]
    assert project["samplingDesign"] in {"simpleRandom", "systematicRandom", "clusteredRandom", "experimental",
                                         "targeted", "opportunistic"}
    assert project["captureMethod"] and set(project["captureMethod"]) <= {"activityDetection", "timeLapse"}
    assert isinstance(project["individualAnimals"], bool)
    assert project["observationLevel"] and set(project["observationLevel"]) <= {"media", "event"}
    assert pkg["spatial"]["type"] in {"Point", "MultiPoint", "Polygon", "MultiPolygon"}
    start, end = date.fromisoformat(pkg["temporal"]["start"]), date.fromisoformat(pkg["temporal"]["end"])
    assert start <= end
    tables = {"deployments": _table(folder / "deployments.csv", "deployments", DEPLOYMENTS),
              "media": _table(folder / "media.csv", "media", MEDIA),
              "observations": _table(folder / "observations.csv", "observations", OBSERVATIONS)}
    deps = {r["deploymentID"] for r in tables["deployments"]}
    assert len(deps) == len(tables["deployments"]), "deploymentID is unique"
    media = {r["mediaID"]: r for r in tables["media"]}
    assert len(media) == len(tables["media"]), "mediaID is unique"
    for r in tables["deployments"]:
        assert _value("deployments", "deploymentEnd", r["deploymentEnd"]) >= \
            _value("deployments", "deploymentStart", r["deploymentStart"])
    for m in tables["media"]:
        assert m["deploymentID"] in deps
        assert FILE_PATH.match(m["filePath"]) and MEDIATYPE.match(m["fileMediatype"])
        if m["exifData"]:
            assert isinstance(json.loads(m["exifData"]), dict)
    obs_ids = [o["observationID"] for o in tables["observations"]]
    assert len(set(obs_ids)) == len(obs_ids), "observationID is unique"
    for o in tables["observations"]:
        assert o["deploymentID"] in deps
        assert o["mediaID"] == "" or o["mediaID"] in media
        assert _value("observations", "eventEnd", o["eventEnd"]) >= _value("observations", "eventStart",
                                                                             o["eventStart"])
        if o["observationLevel"] == "media":
            assert o["mediaID"], "a media-level observation names its media"
        else:
            assert o["mediaID"] == "" and o["eventID"], "an event-level observation names its event, not a media"
        if o["classificationMethod"] == "machine":
            assert o["classifiedBy"].startswith("moevit ") and o["classificationProbability"]
    # taxonomic: the unique observations.scientificName, each with a scientificName
    assert sorted(t["scientificName"] for t in pkg["taxonomic"]) == \
        sorted({o["scientificName"] for o in tables["observations"] if o["scientificName"]})
    reason = frictionless_offline.missing_reason()
    if reason:
        warnings.warn(f"frictionless validation skipped: {reason}", stacklevel=2)
    else:
        assert frictionless_offline.validate_package(folder) == [], "frictionless: the package is not valid"
    return tables


# -------------------------------------------------------------------------------------------------- inputs

LABELS = ["Northern Cardinal", "Blue Jay", "American Robin"]
DESCRIPTIONS = {"0": "Cardinalis cardinalis", "1": "Cyanocitta cristata", "2": "Turdus migratorius"}


def _rec(file, t, top, **kw):
    return {"file": file, "model": "f00d", "prediction": top[0][0], "label": LABELS[top[0][0] % len(LABELS)],
            "confidence": top[0][1], "top5": [list(p) for p in top], "degraded": False, "datetime": t,
            "time_source": "exif:DateTimeOriginal", "time_flags": [],
            "camera": {"make": "RECONYX", "model": "HF2X", "serial": "S1"}, **kw}


def _results(tmp: Path, name="results.json", fingerprint="f00d") -> Path:
    jay, robin = [(1, 0.8), (0, 0.1), (2, 0.1)], [(2, 0.6), (1, 0.3), (0, 0.1)]
    records = [
        _rec("north/a.jpg", "2024-05-01T06:00:00", jay), _rec("north/b.jpg", "2024-05-01T06:00:20", robin),
        _rec("north/c.jpg", "2024-05-01T06:00:40", jay, degraded=True),
        _rec("north/d.jpg", "2024-05-01T09:30:00", robin),
        _rec("south/x.jpg", "2024-05-02T22:00:00+00:00", robin),
        {"file": "south/broken.jpg", "model": "f00d", "error": "unreadable image: cut", "error_kind": "unreadable",
         "datetime": "2024-05-02T22:00:05+00:00", "time_source": "file:mtime", "time_flags": ["no_exif_time"]},
    ]
    doc = res.build_megadetector(records, labels=LABELS, fingerprint=fingerprint, descriptions=DESCRIPTIONS)
    path = tmp / name
    res.write_json_atomic(path, doc)
    return path


def _deployments(tmp: Path, **override) -> Path:
    doc = {"project": {"title": "Test project"},
           "contributors": [{"title": "Jane Doe", "role": "contact", "email": "jane@example.org"}],
           "timezone": "+02:00",
           "deployments": {"north-2024": {"site": "cam", "files": "north/", "latitude": 52.70442,
                                          "longitude": 23.84995, "cameraHeight": 0.8, "baitUse": "none"},
                           "south-2024": {"files": ["south/"], "latitude": -33.9, "longitude": 18.4,
                                          "deploymentStart": "2024-05-01T00:00:00Z",
                                          "deploymentEnd": "2024-05-31T00:00:00Z"}}}
    doc.update(override)
    path = tmp / "deployments.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


# --------------------------------------------------------------------------------------------------- tests


def test_package_has_the_standard_columns_and_types(tmp_path):
    s = export_camtrapdp([_results(tmp_path)], _deployments(tmp_path), tmp_path / "dp")
    # south/broken.jpg has only its file's modification time: left out, not exported as a capture time
    assert s["deployments"] == 2 and s["media"] == 5 and s["dropped"] == 1
    t = check_package(tmp_path / "dp")
    deps = {d["deploymentID"]: d for d in t["deployments"]}
    north = deps["north-2024"]
    # the YAML's naive EXIF times get its timezone; start/end default to the first and last image
    assert (north["deploymentStart"], north["deploymentEnd"]) == ("2024-05-01T06:00:00+02:00",
                                                                  "2024-05-01T09:30:00+02:00")
    assert north["cameraID"] == "S1" and north["cameraModel"] == "RECONYX-HF2X" and north["cameraHeight"] == "0.8"
    assert north["timestampIssues"] == "false" and "site:cam" in north["deploymentTags"]
    assert north["baitUse"] == "false"  # the 0.x value "none"
    assert deps["south-2024"]["timestampIssues"] == "true"  # one image timed by its file
    media = {m["fileName"]: m for m in t["media"]}
    assert media["a.jpg"]["timestamp"] == "2024-05-01T06:00:00+02:00" and media["x.jpg"]["timestamp"] == \
        "2024-05-02T22:00:00Z"
    assert media["a.jpg"]["filePath"] == "north/a.jpg" and media["a.jpg"]["fileMediatype"] == "image/jpeg"
    assert json.loads(media["a.jpg"]["exifData"])["DateTimeOriginal"] == "2024:05:01 06:00:00"
    assert "broken.jpg" not in media
    obs = t["observations"]
    media_obs = {o["mediaID"]: o for o in obs if o["observationLevel"] == "media"}
    a = media_obs[media["a.jpg"]["mediaID"]]
    assert (a["scientificName"], a["classificationMethod"], a["classificationProbability"]) == \
        ("Cyanocitta cristata", "machine", "0.8")
    assert a["classifiedBy"] == "moevit f00d" and a["eventStart"] == a["eventEnd"] == media["a.jpg"]["timestamp"]
    assert media_obs[media["c.jpg"]["mediaID"]]["observationTags"] == "degraded:true"
    events = sorted((o for o in obs if o["observationLevel"] == "event"), key=lambda o: o["eventStart"])
    # north: a, b, c within 60 s -> one event (jay 0.8 + 0.8 beats robin 0.6); d alone; south: x alone
    assert [(e["deploymentID"], e["scientificName"], e["eventStart"], e["eventEnd"]) for e in events] == [
        ("north-2024", "Cyanocitta cristata", "2024-05-01T06:00:00+02:00", "2024-05-01T06:00:40+02:00"),
        ("north-2024", "Turdus migratorius", "2024-05-01T09:30:00+02:00", "2024-05-01T09:30:00+02:00"),
        ("south-2024", "Turdus migratorius", "2024-05-02T22:00:00Z", "2024-05-02T22:00:00Z")]
    assert events[0]["classificationProbability"] == str(round((0.8 + 0.3 + 0.8) / 3, 4))
    assert {o["eventID"] for o in obs if o["mediaID"] in {media[f]["mediaID"] for f in ("a.jpg", "b.jpg", "c.jpg")}} \
        == {events[0]["eventID"]}
    pkg = json.loads((tmp_path / "dp" / "datapackage.json").read_text())
    assert pkg["temporal"] == {"start": "2024-05-01", "end": "2024-05-31"}
    assert pkg["spatial"]["type"] == "Polygon"
    assert {"scientificName": "Cyanocitta cristata", "vernacularNames": {"eng": "Blue Jay"}} in pkg["taxonomic"]
    assert pkg["sources"] == [{"title": "moevit", "version": "f00d"}]


def test_example_deployments_file_loads():
    from moevit.coordinator.camtrapdp import load_deployments

    cfg = load_deployments(Path(__file__).parents[1] / "examples" / "deployments.yaml",
                           sites={"camera-01": "examples/sites.yaml", "pi-north": "", "pi-south": ""})
    assert [d.id for d in cfg.deployments] == ["camera-01-2024-05", "camera-02-2024-05"]
    assert cfg.deployments[0].site == "camera-01" and cfg.deployments[0].prefixes == ("camera-01/",)


def test_cli_writes_the_package_and_gap_option(tmp_path, capsys):
    results, deployments = _results(tmp_path), _deployments(tmp_path)
    assert export_main(["camtrapdp", str(results), "--deployments", str(deployments), "--out",
                        str(tmp_path / "dp"), "--sequence-gap", "30"]) == 0
    assert "2 deployment(s), 5 media" in capsys.readouterr().out
    t = check_package(tmp_path / "dp")
    # with a 30 s gap, a-b-c (20 s apart) stay one event
    assert sum(o["observationLevel"] == "event" for o in t["observations"]) == 3


@pytest.mark.parametrize(("change", "message"), [
    ({"deployments": {"d": {"files": "north/", "latitude": 95, "longitude": 0}}}, r"latitude: 95 out of range"),
    ({"deployments": {"d": {"files": "north/", "longitude": 0}}}, r"missing required key 'latitude'"),
    ({"deployments": {"d": {"latitude": 1, "longitude": 2, "lat": 3}}}, r"unknown key 'lat'"),
    ({"timezone": 600}, r"quote the offset"),
    ({"timezone": "Mars/Olympus"}, r"unknown time zone"),
    ({"contributors": []}, r"contributors: expected a non-empty list"),
    ({"project": {"title": "x", "samplingDesign": "random"}}, r"samplingDesign: 'random' is not one of"),
    ({"deployments": {"north-2024": {"files": "north/", "latitude": 1, "longitude": 2}}},
     r"2 image\(s\) belong to no deployment \(e\.g\. south/"),
])
def test_bad_deployments_files_say_what_is_wrong(tmp_path, change, message):
    with pytest.raises(ExportError, match=message):
        export_camtrapdp([_results(tmp_path)], _deployments(tmp_path, **change), tmp_path / "dp")


def _topology(tmp: Path, model: Path | None = None) -> Path:
    doc = {"coordinator": "cam", "sites": {n: {"address": f"127.0.0.1:{5000 + i}", "device": {
        "gflops": 5, "memory_mb": 256, "active_w": 3, "idle_w": 1}} for i, n in enumerate(("cam", "north"))},
        "links": [{"between": ["cam", "north"], "bandwidth_mbps": 20, "latency_ms": 4}]}
    if model is not None:
        doc["model"] = str(model)
    path = tmp / "sites.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_unknown_site_and_mismatched_inputs_are_refused(tmp_path):
    results, topo = _results(tmp_path), _topology(tmp_path)
    deps = _deployments(tmp_path, deployments={"d": {"site": "camera-9", "latitude": 1, "longitude": 2}})
    with pytest.raises(ExportError, match=r"deployments\.d\.site: unknown site 'camera-9'.*has sites cam, north"):
        export_camtrapdp([results], deps, tmp_path / "dp", topologies=[topo])
    # results of two model versions
    other = _results(tmp_path, "other.json", fingerprint="beef")
    with pytest.raises(ExportError, match=r"different model versions .*model f00d.*model beef"):
        export_camtrapdp([results, other], _deployments(tmp_path), tmp_path / "dp")
    # the topology's model is not the model of the results
    import moevit

    model = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=3,
                                                  moe=moevit.MoEConfig(layers=(8,), num_experts=2, expert_hidden=8)))
    topo = _topology(tmp_path, save_checkpoint(model, tmp_path / "m.safetensors"))
    with pytest.raises(ExportError, match=r"is model [0-9a-f]+, but the results were made by model f00d"):
        export_camtrapdp([results], _deployments(tmp_path), tmp_path / "dp", topologies=[topo])
    # a run log instead of the finished JSON; a missing file
    with pytest.raises(ExportError, match="JSON-lines"):
        export_camtrapdp([tmp_path / "r.json.partial.jsonl"], _deployments(tmp_path), tmp_path / "dp")
    with pytest.raises(ExportError, match="no such results file"):
        export_camtrapdp([tmp_path / "nope.json"], _deployments(tmp_path), tmp_path / "dp")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    deps = _deployments(tmp_path, deployments={"d": {"site": "camera-9", "latitude": 1, "longitude": 2}})
    rc = export_main(["camtrapdp", str(_results(tmp_path)), "--deployments", str(deps), "--topology",
                      str(_topology(tmp_path)), "--out", str(tmp_path / "dp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("moe-export: error:") and "unknown site 'camera-9'" in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Camtrap DP 1.0.2 and time fixes


def test_frictionless_accepts_the_export_offline(tmp_path):
    """frictionless validates the package against the stored 1.0.2 profile and table schemas; any URL without a
    stored copy would raise instead of being fetched."""
    reason = frictionless_offline.missing_reason()
    if reason:
        pytest.skip(reason)
    export_camtrapdp([_results(tmp_path)], _deployments(tmp_path), tmp_path / "dp")
    assert frictionless_offline.validate_package(tmp_path / "dp") == []
    pkg = json.loads((tmp_path / "dp" / "datapackage.json").read_text())
    assert pkg["profile"] == "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json"
    # the validator really checks: a 0.x baitUse value in the table, and the 1.0 profile's broken $ref
    path = tmp_path / "dp" / "deployments.csv"
    good = path.read_text()
    rows = list(csv.DictReader(good.splitlines()))
    rows[0]["baitUse"] = "none"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, DEPLOYMENTS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    assert any("baitUse" in e for e in frictionless_offline.validate_package(tmp_path / "dp"))
    path.write_text(good)
    (tmp_path / "dp" / "datapackage.json").write_text(json.dumps(pkg).replace("camtrap-dp/1.0.2/", "camtrap-dp/1.0/"))
    assert any("$defs/version" in e for e in frictionless_offline.validate_package(tmp_path / "dp"))
    with pytest.raises(frictionless_offline.OfflineFetch):
        frictionless_offline._session().get("https://example.org/elsewhere.json")


def _clock_records():
    """One camera: two triggers of a reset clock (raw EXIF 1999, two hours apart, copied to disk together), an image
    without EXIF copied at the same moment, and a trusted burst."""
    top = [(1, 0.8), (0, 0.1), (2, 0.1)]
    copied = "2024-06-01T12:00:00+02:00"  # every file's modification time: the day they were copied

    def reset(file, raw):
        return _rec(file, copied, top, time_source="file:mtime", time_flags=["clock_before_2000"],
                    exif_datetime=raw)
    return [reset("cam/r1.jpg", "1999:01:01 00:00:00"), reset("cam/r2.jpg", "1999:01:01 00:00:10"),
            reset("cam/r3.jpg", "1999:01:01 02:00:00"),
            _rec("cam/n.jpg", copied, top, time_source="file:mtime", time_flags=["no_exif_time"]),
            _rec("cam/t1.jpg", "2024-05-01T06:00:00", top), _rec("cam/t2.jpg", "2024-05-01T06:00:30", top)]


def test_untrusted_clock_frames_are_sequenced_on_their_own_raw_exif_times():
    doc = res.build_megadetector(_clock_records(), labels=LABELS, fingerprint="f00d")
    seq = {im["file"]: im["seq_id"] for im in doc["images"]}
    # r1/r2 10 s apart: one burst; r3 two hours later: another (their file times are all equal)
    assert seq["cam/r1.jpg"] == seq["cam/r2.jpg"] != seq["cam/r3.jpg"]
    # never merged with the image timed by its file, nor with the trusted burst
    assert len({seq["cam/r1.jpg"], seq["cam/r3.jpg"], seq["cam/n.jpg"], seq["cam/t1.jpg"]}) == 4
    assert seq["cam/t1.jpg"] == seq["cam/t2.jpg"]
    assert seq["cam/r1.jpg"].startswith("cam@S1~clock-")


def _clock_package(tmp: Path, **deployment) -> tuple[dict, list[str]]:
    doc = res.build_megadetector(_clock_records(), labels=LABELS, fingerprint="f00d", descriptions=DESCRIPTIONS)
    res.write_json_atomic(tmp / "r.json", doc)
    deps = _deployments(tmp, deployments={"cam": {"files": "cam/", "latitude": 1.0, "longitude": 2.0,
                                                  **deployment}})
    warned: list[str] = []
    s = export_camtrapdp([tmp / "r.json"], deps, tmp / "dp", warn=warned.append)
    return {"summary": s, **check_package(tmp / "dp")}, warned


def test_file_times_are_never_exported_as_capture_times(tmp_path):
    t, warned = _clock_package(tmp_path)
    assert sorted(m["fileName"] for m in t["media"]) == ["t1.jpg", "t2.jpg"]
    assert t["summary"]["dropped"] == 4
    assert not any("2024-06-01" in v for table in ("media", "observations", "deployments")
                   for row in t[table] for v in row.values())
    dep = t["deployments"][0]
    assert (dep["deploymentStart"], dep["deploymentEnd"], dep["timestampIssues"]) == \
        ("2024-05-01T06:00:00+02:00", "2024-05-01T06:00:30+02:00", "true")
    [w] = [w for w in warned if "left out" in w]
    assert "4 image(s) left out" in w and "3: camera clock before 2000" in w and "1: no EXIF" in w
    assert "clockReset" in w


def test_clock_reset_corrects_a_reset_clock_and_keeps_its_events_apart(tmp_path):
    t, warned = _clock_package(tmp_path, clockReset={"cameraTime": "1999-01-01T00:00:00",
                                                     "actualTime": "2024-05-03T14:00:00"})
    media = {m["fileName"]: m for m in t["media"]}
    assert sorted(media) == ["r1.jpg", "r2.jpg", "r3.jpg", "t1.jpg", "t2.jpg"]  # n.jpg has no camera time at all
    assert [media[f]["timestamp"] for f in ("r1.jpg", "r2.jpg", "r3.jpg")] == [
        "2024-05-03T14:00:00+02:00", "2024-05-03T14:00:10+02:00", "2024-05-03T16:00:00+02:00"]
    assert "clockReset" in media["r1.jpg"]["mediaComments"]
    assert json.loads(media["r1.jpg"]["exifData"])["DateTimeOriginal"] == "1999:01:01 00:00:00"
    event = {o["mediaID"]: o["eventID"] for o in t["observations"] if o["observationLevel"] == "media"}
    ev = {f: event[media[f]["mediaID"]] for f in media}
    assert ev["r1.jpg"] == ev["r2.jpg"] != ev["r3.jpg"] and ev["t1.jpg"] == ev["t2.jpg"]
    assert ev["r1.jpg"].startswith("cam~clock-") and not ev["t1.jpg"].startswith("cam~clock-")
    # each media in exactly one event, every event's frames within its start and end
    events = {o["eventID"]: o for o in t["observations"] if o["observationLevel"] == "event"}
    assert len(events) == 3
    for f, e in ev.items():
        assert events[e]["eventStart"] <= media[f]["timestamp"] <= events[e]["eventEnd"]
    assert t["deployments"][0]["deploymentEnd"] == "2024-05-03T16:00:00+02:00"
    assert any("1 image(s) left out" in w for w in warned)


def test_file_path_is_a_url_or_inside_the_package(tmp_path):
    results = _results(tmp_path)
    warned: list[str] = []
    export_camtrapdp([results], _deployments(tmp_path, mediaBase="https://data.example.org/traps 2024/"),
                     tmp_path / "dp", warn=warned.append)
    media = {m["fileName"]: m for m in check_package(tmp_path / "dp")["media"]}
    assert media["a.jpg"]["filePath"] == "https://data.example.org/traps 2024/north/a.jpg"
    assert not any("filePath" in w for w in warned)
    # no mediaBase: a path inside the package, and a warning until the images are there
    (tmp_path / "dp2" / "north").mkdir(parents=True)
    (tmp_path / "dp2" / "north" / "a.jpg").write_bytes(b"x")
    export_camtrapdp([results], _deployments(tmp_path), tmp_path / "dp2", warn=warned.append)
    assert check_package(tmp_path / "dp2")["media"][0]["filePath"] == "north/a.jpg"
    assert any("4 of 5 image(s) are not under" in w for w in warned)
    for bad in ("/data/traps/", "../traps/", "media"):
        with pytest.raises(ExportError, match=r"mediaBase: .*a URL .* or a folder inside the package"):
            export_camtrapdp([results], _deployments(tmp_path, mediaBase=bad), tmp_path / "dp3")


def test_media_with_spaces_get_percent_encoded_urls(tmp_path):
    from moevit.coordinator.camtrapdp import file_path

    assert file_path("https://x.org/a/", "cam 1/ü.jpg") == "https://x.org/a/cam%201/%C3%BC.jpg"
    assert file_path("media/", "cam 1/ü.jpg") == "media/cam 1/ü.jpg"
    with pytest.raises(ExportError, match="cannot be a Camtrap DP filePath"):
        file_path("", ".hidden/a.jpg")


def test_package_names_are_transliterated_not_truncated(tmp_path):
    from moevit.coordinator.camtrapdp import package_name

    assert package_name("Białowieża Forest – żubr & Øresund Straße") == "bialowieza-forest-zubr-oresund-strasse"
    assert package_name("Ñandú survey 2024") == "nandu-survey-2024"
    assert re.fullmatch(r"moevit-camtrap-dp-[0-9a-f]{8}", package_name("東京"))
    export_camtrapdp([_results(tmp_path)], _deployments(tmp_path, project={"title": "Puszcza Białowieska"}),
                     tmp_path / "dp")
    assert json.loads((tmp_path / "dp" / "datapackage.json").read_text())["name"] == "puszcza-bialowieska"


def test_bait_use_and_feature_type_follow_the_1_0_vocabularies(tmp_path):
    deps = _deployments(tmp_path, deployments={
        "north-2024": {"files": "north/", "latitude": 1, "longitude": 2, "baitUse": "scent",
                       "featureType": "trailGame", "deploymentTags": "grid:A"},
        "south-2024": {"files": "south/", "latitude": 1, "longitude": 2, "baitUse": True}})
    export_camtrapdp([_results(tmp_path)], deps, tmp_path / "dp")
    rows = {d["deploymentID"]: d for d in check_package(tmp_path / "dp")["deployments"]}
    assert (rows["north-2024"]["baitUse"], rows["north-2024"]["deploymentTags"]) == ("true", "grid:A|bait:scent")
    assert rows["north-2024"]["featureType"] == "trailGame" and rows["south-2024"]["baitUse"] == "true"
    for value, message in (("trailgame", r"featureType: 'trailgame' is not a Camtrap DP 1.0 feature type.*did you "
                                         r"mean 'trailGame'"),):
        bad = _deployments(tmp_path, deployments={"d": {"latitude": 1, "longitude": 2, "featureType": value}})
        with pytest.raises(ExportError, match=message):
            export_camtrapdp([_results(tmp_path)], bad, tmp_path / "dp")
    bad = _deployments(tmp_path, deployments={"d": {"latitude": 1, "longitude": 2, "baitUse": "meat"}})
    with pytest.raises(ExportError, match=r"baitUse: expected true or false"):
        export_camtrapdp([_results(tmp_path)], bad, tmp_path / "dp")


def test_warns_when_the_results_have_no_taxa(tmp_path):
    doc = res.build_megadetector(res.records_from_megadetector(json.loads(_results(tmp_path).read_text())),
                                 labels=LABELS, fingerprint="f00d")
    res.write_json_atomic(tmp_path / "plain.json", doc)
    warned: list[str] = []
    export_camtrapdp([tmp_path / "plain.json"], _deployments(tmp_path), tmp_path / "dp", warn=warned.append)
    assert any("no scientific names" in w and "--taxa" in w for w in warned)
    warned.clear()
    export_camtrapdp([_results(tmp_path)], _deployments(tmp_path), tmp_path / "dp", warn=warned.append)
    assert not any("scientific names" in w for w in warned)


def test_export_changes_none_of_its_inputs(tmp_path):
    from moevit.coordinator.camtrapdp import load_deployments

    results = _results(tmp_path)
    before = results.read_bytes()
    cfg = load_deployments(_deployments(tmp_path, deployments={
        "north": {"latitude": 1, "longitude": 2}, "south": {"latitude": 3, "longitude": 4}}))
    snapshot = copy.deepcopy(cfg)
    export_camtrapdp([results], cfg, tmp_path / "dp")  # default prefixes (<id>/) computed, not stored
    export_camtrapdp([results], cfg, tmp_path / "dp2")
    assert cfg == snapshot and results.read_bytes() == before
    assert cfg.deployments[0].prefixes == ()
    assert (tmp_path / "dp" / "media.csv").read_bytes() == (tmp_path / "dp2" / "media.csv").read_bytes()


def test_blank_person_and_vehicle_classes_become_observation_types(tmp_path):
    labels = ["blank", "Blue Jay", "person", "vehicle"]
    recs = [_rec(f"north/{i}.jpg", f"2024-05-01T0{i}:00:00", top, prediction=top[0][0], label=labels[top[0][0]],
                 blank=i == 0)  # the first: emptied by the blank filter (detections: [])
            for i, top in enumerate(([(0, 0.9), (1, 0.1)], [(1, 0.7), (0, 0.3)], [(2, 0.8), (1, 0.2)],
                                     [(3, 0.6), (0, 0.4)]))]
    res.write_json_atomic(tmp_path / "r.json", res.build_megadetector(recs, labels=labels, fingerprint="f00d"))
    deps = _deployments(tmp_path, deployments={"north-2024": {"latitude": 1, "longitude": 2}})
    export_camtrapdp([tmp_path / "r.json"], deps, tmp_path / "dp")
    t = check_package(tmp_path / "dp")
    media = {m["mediaID"]: m["fileName"] for m in t["media"]}
    got = {media[o["mediaID"]]: (o["observationType"], o["scientificName"]) for o in t["observations"]
           if o["observationLevel"] == "media"}
    assert got == {"0.jpg": ("blank", ""), "1.jpg": ("animal", "Blue Jay"), "2.jpg": ("human", ""),
                   "3.jpg": ("vehicle", "")}
    blank = next(o for o in t["observations"] if o["observationLevel"] == "media" and media[o["mediaID"]] == "0.jpg")
    assert blank["classificationProbability"] == "0.9"  # kept in moevit_classifications
    events = sorted(o["observationType"] for o in t["observations"] if o["observationLevel"] == "event")
    assert events == ["animal", "blank", "human", "vehicle"]
    assert [x["scientificName"] for x in json.loads((tmp_path / "dp" / "datapackage.json").read_text())[
        "taxonomic"]] == ["Blue Jay"]
