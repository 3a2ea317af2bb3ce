"""Camtrap DP 1.0 export: exactly the standard's columns in its order, valid types and constraints (checked here
against the standard's table schemas and profile, written out below independently of the exporter), events from
sequences, and clear messages for bad inputs."""

from __future__ import annotations

import csv
import json
import re
from datetime import date, datetime
from pathlib import Path

import pytest
import yaml
from moevit.coordinator import results as res
from moevit.coordinator.camtrapdp import ExportError, export_camtrapdp
from moevit.coordinator.export_cli import main as export_main

from moevit.checkpoint import save_checkpoint

# Camtrap DP 1.0 (https://camtrap-dp.tdwg.org/data/; unchanged in 1.0.1 and 1.0.2): every field of each table
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
    ("deployments", "baitUse"): {"none", "scent", "food", "visual", "acoustic", "other"},
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
                    "detectionDistance": ("number", 0, None), "timestampIssues": ("boolean",)},
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
VERSION = "1.0"


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
    """A Camtrap DP 1.0 package: the descriptor per the profile, the three tables per their schemas, the keys."""
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
    return tables


# -------------------------------------------------------------------------------------------------- inputs

LABELS = ["Northern Cardinal", "Blue Jay", "American Robin"]
DESCRIPTIONS = {"0": "Cardinalis cardinalis", "1": "Cyanocitta cristata", "2": "Turdus migratorius"}


def _rec(file, t, top, **kw):
    return {"file": file, "model": "f00d", "prediction": top[0][0], "label": LABELS[top[0][0]],
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
    assert s["deployments"] == 2 and s["media"] == 6
    t = check_package(tmp_path / "dp")
    deps = {d["deploymentID"]: d for d in t["deployments"]}
    north = deps["north-2024"]
    # the YAML's naive EXIF times get its timezone; start/end default to the first and last image
    assert (north["deploymentStart"], north["deploymentEnd"]) == ("2024-05-01T06:00:00+02:00",
                                                                  "2024-05-01T09:30:00+02:00")
    assert north["cameraID"] == "S1" and north["cameraModel"] == "RECONYX-HF2X" and north["cameraHeight"] == "0.8"
    assert north["timestampIssues"] == "false" and "site:cam" in north["deploymentTags"]
    assert deps["south-2024"]["timestampIssues"] == "true"  # one image timed by its file
    media = {m["fileName"]: m for m in t["media"]}
    assert media["a.jpg"]["timestamp"] == "2024-05-01T06:00:00+02:00" and media["x.jpg"]["timestamp"] == \
        "2024-05-02T22:00:00Z"
    assert media["a.jpg"]["filePath"] == "north/a.jpg" and media["a.jpg"]["fileMediatype"] == "image/jpeg"
    assert json.loads(media["a.jpg"]["exifData"])["DateTimeOriginal"] == "2024:05:01 06:00:00"
    assert "modification time" in media["broken.jpg"]["mediaComments"]
    obs = t["observations"]
    media_obs = {o["mediaID"]: o for o in obs if o["observationLevel"] == "media"}
    a = media_obs[media["a.jpg"]["mediaID"]]
    assert (a["scientificName"], a["classificationMethod"], a["classificationProbability"]) == \
        ("Cyanocitta cristata", "machine", "0.8")
    assert a["classifiedBy"] == "moevit f00d" and a["eventStart"] == a["eventEnd"] == media["a.jpg"]["timestamp"]
    assert media_obs[media["c.jpg"]["mediaID"]]["observationTags"] == "degraded:true"
    assert media_obs[media["broken.jpg"]["mediaID"]]["observationType"] == "unclassified"
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
    assert "2 deployment(s), 6 media" in capsys.readouterr().out
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
