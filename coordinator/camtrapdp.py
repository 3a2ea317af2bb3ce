"""Camtrap DP 1.0 export of moevit results: ``datapackage.json``, ``deployments.csv``, ``media.csv``,
``observations.csv`` (https://camtrap-dp.tdwg.org, the TDWG standard read by GBIF, camtrapR and camtrapdp).

Inputs: one or more MegaDetector results files written by ``moe-coordinator --out results.json`` (same model) and
a deployments file (``examples/deployments.yaml``, documented in ``docs/outputs.md``) saying where each camera
stood, when, and which image files it took. Each image becomes a media row and a media-level observation; each
sequence (images of one deployment no more than ``gap`` seconds apart) becomes an event-level observation labelled
by the confidence-weighted majority of its frames.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from moevit.coordinator.fieldmeta import (
    DEFAULT_SEQUENCE_GAP_S,
    SOURCE_EXIF_ORIGINAL,
    assign_sequences,
    parse_iso,
    sequence_label,
)
from moevit.coordinator.results import fingerprint_of, write_bytes_atomic

__all__ = [
    "DEPLOYMENT_COLUMNS",
    "MEDIA_COLUMNS",
    "OBSERVATION_COLUMNS",
    "PROFILE",
    "Deployment",
    "DeploymentsFile",
    "ExportError",
    "export_camtrapdp",
    "load_deployments",
    "read_results",
]

CAMTRAP_DP_VERSION = "1.0"
_BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}/"
PROFILE = _BASE + "camtrap-dp-profile.json"
SCHEMAS = {name: f"{_BASE}{name}-table-schema.json" for name in ("deployments", "media", "observations")}

# The standard's columns, in the order of its table schemas (Camtrap DP 1.0; unchanged in 1.0.1 and 1.0.2).
DEPLOYMENT_COLUMNS = (
    "deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
    "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay", "cameraHeight",
    "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues", "baitUse", "featureType",
    "habitat", "deploymentGroups", "deploymentTags", "deploymentComments",
)
MEDIA_COLUMNS = (
    "mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName", "fileMediatype",
    "exifData", "favorite", "mediaComments",
)
OBSERVATION_COLUMNS = (
    "observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
    "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior", "individualID",
    "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX", "bboxY", "bboxWidth",
    "bboxHeight", "classificationMethod", "classifiedBy", "classificationTimestamp", "classificationProbability",
    "observationTags", "observationComments",
)

SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic")
CAPTURE_METHODS = ("activityDetection", "timeLapse")
CONTRIBUTOR_ROLES = ("contact", "principalInvestigator", "rightsHolder", "publisher", "contributor")
BAIT_USE = ("none", "scent", "food", "visual", "acoustic", "other")

# deployments.yaml: keys of a deployment besides the Camtrap DP columns it may set directly
_DEPLOYMENT_EXTRA = ("site", "files", "timezone")
_DEPLOYMENT_TYPES: dict[str, tuple[str, float | None, float | None]] = {
    "latitude": ("number", -90, 90), "longitude": ("number", -180, 180), "coordinateUncertainty": ("integer", 1, None),
    "cameraDelay": ("integer", 0, None), "cameraHeight": ("number", 0, None), "cameraDepth": ("number", 0, None),
    "cameraTilt": ("integer", -90, 90), "cameraHeading": ("integer", 0, 360), "detectionDistance": ("number", 0, None),
    "timestampIssues": ("boolean", None, None), "deploymentStart": ("datetime", None, None),
    "deploymentEnd": ("datetime", None, None),
}
_TOP_KEYS = {"required": ("project", "contributors", "deployments"),
             "optional": ("name", "title", "description", "timezone", "filePublic", "mediaBase", "licenses",
                          "keywords", "bibliographicCitation", "coordinatePrecision")}
_PROJECT_KEYS = {"required": ("title",),
                 "optional": ("id", "acronym", "description", "path", "samplingDesign", "captureMethod",
                              "individualAnimals")}
_MEDIATYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})\Z")
_UTC = dt.timezone.utc


class ExportError(ValueError):
    """Inputs that cannot make a valid package; the message names the file, the key and what to do."""


# -------------------------------------------------------------------------------------------- deployments.yaml


@dataclass
class Deployment:
    id: str
    site: str | None
    prefixes: tuple[str, ...]
    tz: dt.tzinfo | None
    columns: dict[str, Any] = field(default_factory=dict)  # Camtrap DP columns given in the file


@dataclass
class DeploymentsFile:
    path: str
    project: dict[str, Any]
    contributors: list[dict[str, Any]]
    deployments: list[Deployment]
    tz: dt.tzinfo | None
    package: dict[str, Any]
    file_public: bool = False
    media_base: str = ""


def _fail(file: str, key: str, problem: str) -> ExportError:
    return ExportError(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


def _check_keys(d: Mapping[str, Any], file: str, key: str, allowed: Sequence[str], required: Sequence[str]) -> None:
    import difflib

    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(file, f"{key}.{k}" if key else str(k), f"unknown key {k!r} (allowed: {', '.join(allowed)})"
                        + hint)
    for k in required:
        if k not in d:
            raise _fail(file, f"{key}.{k}" if key else str(k), f"missing required key {k!r}")


def parse_timezone(value: Any, file: str, key: str) -> dt.tzinfo:
    """``'+02:00'``, ``'-0530'``, ``'Z'``/``'UTC'`` or an IANA name such as ``'Europe/Brussels'``."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise _fail(file, key, f"got the number {value}: quote the offset, e.g. timezone: \"+02:00\" (YAML reads "
                    "an unquoted 10:00 as a base-60 number)")
    if not isinstance(value, str) or not value.strip():
        raise _fail(file, key, f"expected a UTC offset like \"+02:00\" or a zone name, got {value!r}")
    s = value.strip()
    if s.upper() in ("Z", "UTC"):
        return _UTC
    m = _OFFSET.match(s)
    if m:
        minutes = int(m[2]) * 60 + int(m[3])
        if minutes > 18 * 60:
            raise _fail(file, key, f"offset {s} out of range (-18:00 to +18:00)")
        return dt.timezone(dt.timedelta(minutes=-minutes if m[1] == "-" else minutes))
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(s)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError, missing tz database
        raise _fail(file, key, f"unknown time zone {s!r}: give a UTC offset like \"+02:00\" or an IANA name "
                    "like \"Europe/Brussels\"") from None


def _datetime(value: Any, tz: dt.tzinfo | None, file: str, key: str) -> tuple[dt.datetime, bool]:
    """(aware datetime, whether the zone had to be assumed UTC)."""
    if isinstance(value, dt.datetime):
        d = value
    elif isinstance(value, dt.date):
        d = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        d = parse_iso(value.strip())
        if d is None:
            raise _fail(file, key, f"expected an ISO 8601 date-time like 2024-05-01T00:00:00+02:00, got {value!r}")
    else:
        raise _fail(file, key, f"expected an ISO 8601 date-time, got {value!r}")
    if d.tzinfo is None:
        return d.replace(tzinfo=tz or _UTC), tz is None
    return d, False


def _typed(value: Any, kind: str, lo: float | None, hi: float | None, file: str, key: str) -> Any:
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _fail(file, key, f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(file, key, f"expected a {kind}, got {value!r}" + (" (numbers are not quoted)"
                                                                       if isinstance(value, str) else ""))
    if kind == "integer" and value != int(value):
        raise _fail(file, key, f"expected an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{lo if lo is not None else '-inf'} to {hi if hi is not None else 'inf'}"
        raise _fail(file, key, f"{value} out of range ({rng})")
    return int(value) if kind == "integer" else float(value)


def load_deployments(path: str | os.PathLike[str], *, sites: Mapping[str, str] | None = None
                     ) -> DeploymentsFile:
    """Read and check a deployments file. ``sites`` (site name -> the topology file naming it) checks that every
    ``site:`` exists; without it ``site`` is only a label."""
    from moevit.deploy.topology import TopologyError, read_yaml

    file = str(path)
    try:
        doc = read_yaml(path)
    except TopologyError as e:
        raise ExportError(str(e)) from None
    if not isinstance(doc, dict):
        raise _fail(file, "", "expected a mapping with project, contributors and deployments")
    _check_keys(doc, file, "", (*_TOP_KEYS["required"], *_TOP_KEYS["optional"]), _TOP_KEYS["required"])
    project = doc["project"]
    if not isinstance(project, dict):
        raise _fail(file, "project", "expected a mapping (title, samplingDesign, ...)")
    _check_keys(project, file, "project", (*_PROJECT_KEYS["required"], *_PROJECT_KEYS["optional"]),
                _PROJECT_KEYS["required"])
    project = {"samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
               "individualAnimals": False, **project}
    if project["samplingDesign"] not in SAMPLING_DESIGNS:
        raise _fail(file, "project.samplingDesign", f"{project['samplingDesign']!r} is not one of "
                    f"{', '.join(SAMPLING_DESIGNS)}")
    methods = project["captureMethod"]
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not methods or any(m not in CAPTURE_METHODS for m in methods):
        raise _fail(file, "project.captureMethod", f"expected a list of {', '.join(CAPTURE_METHODS)}, got "
                    f"{project['captureMethod']!r}")
    project["captureMethod"] = list(dict.fromkeys(methods))
    if not isinstance(project["individualAnimals"], bool):
        raise _fail(file, "project.individualAnimals", "expected true or false")
    contributors = doc["contributors"]
    if not isinstance(contributors, list) or not contributors:
        raise _fail(file, "contributors", "expected a non-empty list of {title, role, email, ...}")
    for i, c in enumerate(contributors):
        if not isinstance(c, dict) or not isinstance(c.get("title"), str) or not c["title"].strip():
            raise _fail(file, f"contributors[{i}]", "each contributor needs a title (the person's or "
                        "organisation's name)")
        if c.get("role", "contributor") not in CONTRIBUTOR_ROLES:
            raise _fail(file, f"contributors[{i}].role", f"{c['role']!r} is not one of {', '.join(CONTRIBUTOR_ROLES)}")
    tz = parse_timezone(doc["timezone"], file, "timezone") if "timezone" in doc else None
    raw = doc["deployments"]
    if not isinstance(raw, dict) or not raw:
        raise _fail(file, "deployments", "expected a mapping of deploymentID -> {latitude, longitude, ...}")
    allowed = (*(c for c in DEPLOYMENT_COLUMNS if c != "deploymentID"), *_DEPLOYMENT_EXTRA)
    deployments = []
    for name, d in raw.items():
        key = f"deployments.{name}"
        if not isinstance(name, str) or not name.strip():
            raise _fail(file, key, "a deploymentID must be a non-empty string")
        if not isinstance(d, dict):
            raise _fail(file, key, "expected a mapping (latitude, longitude, files, ...)")
        _check_keys(d, file, key, allowed, ("latitude", "longitude"))
        dtz = parse_timezone(d["timezone"], file, f"{key}.timezone") if "timezone" in d else tz
        site = d.get("site")
        if site is None and sites is not None and name in sites:
            site = name  # sites map to deployments by name
        if site is not None:
            if not isinstance(site, str):
                raise _fail(file, f"{key}.site", f"expected a site name, got {site!r}")
            if sites is not None and site not in sites:
                topo_files = ", ".join(sorted(set(sites.values())))
                raise _fail(file, f"{key}.site", f"unknown site {site!r}: the topology ({topo_files}) has sites "
                            f"{', '.join(sorted(sites))}")
        files = d.get("files")
        prefixes: tuple[str, ...] = ()
        if files is not None:
            items = [files] if isinstance(files, str) else files
            if not isinstance(items, list) or not items or not all(isinstance(p, str) and p.strip() for p in items):
                raise _fail(file, f"{key}.files", "expected a folder/prefix or a list of them, e.g. cam01/")
            prefixes = tuple(_norm_prefix(p) for p in items)
        columns: dict[str, Any] = {}
        for col, value in d.items():
            if col in _DEPLOYMENT_EXTRA or value is None:
                continue
            kind = _DEPLOYMENT_TYPES.get(col)
            if kind is None:
                if col == "baitUse" and value not in BAIT_USE:
                    raise _fail(file, f"{key}.baitUse", f"{value!r} is not one of {', '.join(BAIT_USE)}")
                columns[col] = str(value)
            elif kind[0] == "datetime":
                columns[col] = _datetime(value, dtz, file, f"{key}.{col}")[0]
            else:
                columns[col] = _typed(value, kind[0], kind[1], kind[2], file, f"{key}.{col}")
        deployments.append(Deployment(name, site, prefixes, dtz, columns))
    package = {k: doc[k] for k in ("name", "title", "description", "licenses", "keywords", "bibliographicCitation",
                                   "coordinatePrecision") if k in doc}
    public = doc.get("filePublic", False)
    if not isinstance(public, bool):
        raise _fail(file, "filePublic", "expected true or false")
    base = doc.get("mediaBase", "")
    if not isinstance(base, str):
        raise _fail(file, "mediaBase", "expected a URL or relative path prefix")
    return DeploymentsFile(file, project, [dict(c) for c in contributors], deployments, tz, package, public, base)


def _norm_prefix(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


# ------------------------------------------------------------------------------------------------------ results


def read_results(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[dict[str, Any]], str]:
    """The moevit MegaDetector documents at ``paths`` (all of one model) and that model's fingerprint."""
    docs: list[dict[str, Any]] = []
    fps: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if path.name.endswith(".jsonl"):
            raise ExportError(f"{path}: a JSON-lines file; the export reads the MegaDetector results (.json) a run "
                              "writes when it ends (finish or resume the run with --out results.json)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExportError(f"{path}: no such results file") from None
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: not a readable JSON results file ({e})") from None
        fp = fingerprint_of(doc) if isinstance(doc, dict) else None
        if fp is None or not isinstance(doc.get("images"), list):
            raise ExportError(f"{path}: not moevit MegaDetector output (no info.classifier_metadata.version); "
                              "make it with moe-coordinator --out results.json")
        fps[str(path)] = fp
        doc["_path"] = str(path)
        docs.append(doc)
    if len(set(fps.values())) > 1:
        listing = "; ".join(f"{p}: model {fp}" for p, fp in fps.items())
        raise ExportError(f"the results come from different model versions ({listing}): one package holds the "
                          "classifications of one model; export them separately or re-run with one model")
    return docs, next(iter(fps.values()))


def model_file_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The fingerprint stored in a moevit checkpoint's metadata (None when the file has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint")


# ------------------------------------------------------------------------------------------------------- export


def _iso(d: dt.datetime) -> str:
    s = d.isoformat(timespec="seconds")
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dt.datetime):
        return _iso(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue().encode("utf-8")


def _media_id(file: str) -> str:
    return hashlib.sha1(file.encode()).hexdigest()[:12]


_FLAG_TEXT = {
    "no_exif_time": "no EXIF capture time: timestamp from the file's modification time",
    "exif_time_unparseable": "EXIF capture time unreadable: timestamp from the file's modification time",
    "clock_before_2000": "camera clock before 2000 (not trusted): timestamp from the file's modification time",
    "clock_in_future": "camera clock in the future (not trusted): timestamp from the file's modification time",
    "mtime_implausible": "the file's modification time is implausible too",
    "no_time": "no timestamp at all",
}


def export_camtrapdp(results: Sequence[str | os.PathLike[str]], deployments: str | os.PathLike[str],
                     out_dir: str | os.PathLike[str], *, topologies: Sequence[str | os.PathLike[str]] = (),
                     gap_s: float | None = None, now: dt.datetime | None = None,
                     warn: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write the package into ``out_dir``; returns counts (deployments, media, observations, events)."""
    docs, fingerprint = read_results(results)
    sites: dict[str, str] | None = None
    if topologies:
        from moevit.deploy.topology import TopologyError, load_topology

        sites = {}
        for tp in topologies:
            try:
                topo = load_topology(tp)
            except TopologyError as e:
                raise ExportError(str(e)) from None
            sites.update({name: str(tp) for name in topo.sites})
            if topo.model is not None and Path(topo.model).is_file():
                model_fp = model_file_fingerprint(topo.model)
                if model_fp is not None and model_fp != fingerprint:
                    raise ExportError(f"{tp}: its model {topo.model} is model {model_fp}, but the results were "
                                      f"made by model {fingerprint}: the results come from another model version "
                                      "than this deployment runs; export with the matching topology or re-run")
    cfg = load_deployments(deployments, sites=sites)
    if gap_s is None:
        gaps = {float(d["info"].get("moevit_sequence_gap_s", DEFAULT_SEQUENCE_GAP_S)) for d in docs}
        gap_s = gaps.pop() if len(gaps) == 1 else DEFAULT_SEQUENCE_GAP_S
    now = now or dt.datetime.now(_UTC)
    first = docs[0]
    categories: dict[str, str] = first.get("classification_categories") or {}
    descriptions: dict[str, str] = first.get("classification_category_descriptions") or {}
    classified_by = f"moevit {fingerprint}"

    images: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for doc in docs:
        for im in doc["images"]:
            if im["file"] in seen:
                raise ExportError(f"{im['file']} appears in {seen[im['file']]} and {doc['_path']}: export results "
                                  "of distinct image sets (or one results file)")
            seen[im["file"]] = doc["_path"]
            completed = parse_iso(doc["info"].get("moevit_completion_time"))
            images.append({**im, "_classified_at": completed})

    # which deployment took each image: the longest matching prefix
    deps = cfg.deployments
    single = len(deps) == 1 and not deps[0].prefixes
    for d in deps:
        if not d.prefixes and not single:  # default: the folder named like the deployment (or its site)
            d.prefixes = tuple(dict.fromkeys(p for p in (f"{d.id}/", f"{d.site}/" if d.site else None) if p))
    owner: dict[str, Deployment] = {}
    unmatched = []
    for im in images:
        if single:
            owner[im["file"]] = deps[0]
            continue
        best = max(((len(p), i) for i, d in enumerate(deps) for p in d.prefixes if im["file"].startswith(p)),
                   default=None)
        if best is None:
            unmatched.append(im["file"])
        else:
            owner[im["file"]] = deps[best[1]]
    if unmatched:
        examples = ", ".join(unmatched[:3])
        raise ExportError(f"{cfg.path}: {len(unmatched)} image(s) belong to no deployment (e.g. {examples}); give "
                          "each deployment the folder/prefix of its files with `files:` (docs/outputs.md)")

    # timestamps
    assumed_utc: set[str] = set()
    issues: dict[str, bool] = {d.id: False for d in deps}
    stamp: dict[str, dt.datetime] = {}
    for im in images:
        d = owner[im["file"]]
        t = parse_iso(im.get("datetime"))
        if t is None:
            raise ExportError(f"{im['file']}: no capture time in the results (results of a --data run, or made by "
                              "an older moevit); Camtrap DP needs a timestamp for every media file")
        if t.tzinfo is None:
            if d.tz is None:
                assumed_utc.add(d.id)
            t = t.replace(tzinfo=d.tz or _UTC)
        stamp[im["file"]] = t
        if im.get("moevit_time_flags"):
            issues[d.id] = True
    for dep_id in sorted(assumed_utc):
        issues[dep_id] = True
        warn(f"deployment {dep_id}: no timezone in {cfg.path}; camera times written as UTC and timestampIssues "
             "set (add timezone: \"+HH:MM\")")

    # sequences per deployment, in UTC order
    ok = [im for im in images if not im.get("failure")]
    frames = assign_sequences(((im["file"], owner[im["file"]].id, stamp[im["file"]].astimezone(_UTC)) for im in ok),
                              gap_s)

    def sci(cid: str) -> str:
        return str(descriptions.get(cid) or categories.get(cid) or cid)

    media_rows, obs_rows = [], []
    by_event: dict[str, list[dict[str, Any]]] = {}
    for im in sorted(images, key=lambda im: (owner[im["file"]].id, stamp[im["file"]], im["file"])):
        d, t, file = owner[im["file"]], stamp[im["file"]], im["file"]
        mid = _media_id(file)
        comments = [_FLAG_TEXT.get(f, f) for f in im.get("moevit_time_flags") or []]
        if im.get("failure"):
            comments.append(f"not classified: {im['failure']}")
        exif = {}
        cam = im.get("moevit_camera") or {}
        for k, name in (("make", "Make"), ("model", "Model"), ("serial", "BodySerialNumber")):
            if cam.get(k):
                exif[name] = cam[k]
        if im.get("moevit_time_source") == SOURCE_EXIF_ORIGINAL and im.get("datetime"):
            exif["DateTimeOriginal"] = parse_iso(im["datetime"]).strftime("%Y:%m:%d %H:%M:%S")  # type: ignore[union-attr]
        suffix = PurePosixPath(file).suffix.lower()
        media_rows.append({
            "mediaID": mid, "deploymentID": d.id, "captureMethod": cfg.project["captureMethod"][0], "timestamp": t,
            "filePath": cfg.media_base + file, "filePublic": cfg.file_public, "fileName": PurePosixPath(file).name,
            "fileMediatype": _MEDIATYPES.get(suffix, "image/" + (suffix[1:] or "jpeg")),
            "exifData": json.dumps(exif, sort_keys=True) if exif else None,
            "mediaComments": "; ".join(comments) or None,
        })
        obs: dict[str, Any] = {"observationID": f"{mid}_1", "deploymentID": d.id, "mediaID": mid, "eventStart": t,
                               "eventEnd": t, "observationLevel": "media"}
        if im.get("failure"):
            obs.update(observationType="unclassified", observationComments=f"moevit: {im['failure']}")
        else:
            det = im["detections"][0]
            top_id, top_p = det["classifications"][0]
            event = frames[file].seq_id
            by_event.setdefault(event, []).append(im)
            tags = ["degraded:true"] if im.get("moevit_degraded") else []
            obs.update(eventID=event, observationType="animal", scientificName=sci(top_id),
                       classificationMethod="machine", classifiedBy=classified_by,
                       classificationTimestamp=im["_classified_at"], classificationProbability=float(top_p),
                       observationTags="|".join(tags) or None)
        obs_rows.append(obs)
    for event, members in by_event.items():
        members.sort(key=lambda im: frames[im["file"]].frame_num)
        label = sequence_label([[(int(c), float(p)) for c, p in im["detections"][0]["classifications"]]
                                for im in members])
        assert label is not None
        d = owner[members[0]["file"]]
        tags = [f"frames:{len(members)}"] + (["degraded:true"] if any(m.get("moevit_degraded") for m in members)
                                             else [])
        obs_rows.append({
            "observationID": f"{event}_event", "deploymentID": d.id, "eventID": event,
            "eventStart": stamp[members[0]["file"]], "eventEnd": stamp[members[-1]["file"]],
            "observationLevel": "event", "observationType": "animal", "scientificName": sci(str(label[0])),
            "classificationMethod": "machine", "classifiedBy": classified_by,
            "classificationTimestamp": max((m["_classified_at"] for m in members if m["_classified_at"]),
                                           default=None),
            "classificationProbability": round(label[1], 4), "observationTags": "|".join(tags),
            "observationComments": f"moevit: confidence-weighted majority of {len(members)} frame(s)",
        })

    # deployments
    dep_rows = []
    for d in deps:
        own = [im for im in images if owner[im["file"]] is d]
        mine = [stamp[im["file"]] for im in own]
        trusted = [stamp[im["file"]] for im in own if not im.get("moevit_time_flags")] or mine
        row: dict[str, Any] = {"deploymentID": d.id, **d.columns}
        for col, pick in (("deploymentStart", min), ("deploymentEnd", max)):
            if col not in row:
                if not trusted:
                    raise _fail(cfg.path, f"deployments.{d.id}", f"no images and no {col}: give {col} (ISO 8601 "
                                "with offset)")
                row[col] = pick(trusted)  # flagged (file) times do not stretch the deployment
        if row["deploymentEnd"] < row["deploymentStart"]:
            raise _fail(cfg.path, f"deployments.{d.id}", "deploymentEnd is before deploymentStart")
        outside = [t for im, t in zip(own, mine, strict=True) if not im.get("moevit_time_flags")
                   and not row["deploymentStart"] <= t <= row["deploymentEnd"]]
        if outside:
            warn(f"deployment {d.id}: {len(outside)} image(s) with trusted EXIF times lie outside "
                 "deploymentStart..deploymentEnd")
        cameras = [im.get("moevit_camera") or {} for im in own]
        serials = {c["serial"] for c in cameras if c.get("serial")}
        makes = {(c.get("make"), c.get("model")) for c in cameras if c.get("make") or c.get("model")}
        if "cameraID" not in row and len(serials) == 1:  # images without EXIF do not count against it
            row["cameraID"] = serials.pop()
        if "cameraModel" not in row and len(makes) == 1:
            row["cameraModel"] = "-".join(x for x in makes.pop() if x)
        if "locationName" not in row and d.site:
            row["locationName"] = d.site
        if "timestampIssues" not in row:
            row["timestampIssues"] = issues[d.id]
        if d.site:
            row["deploymentTags"] = "|".join(x for x in (row.get("deploymentTags"), f"site:{d.site}") if x)
        dep_rows.append(row)

    # datapackage.json
    used = sorted({r["scientificName"] for r in obs_rows if r.get("scientificName")})
    common = {sci(cid): name for cid, name in categories.items()}
    taxonomic = []
    for name in used:
        entry: dict[str, Any] = {"scientificName": name}
        if common.get(name) and common[name] != name:
            entry["vernacularNames"] = {"eng": common[name]}
        taxonomic.append(entry)
    lats = [r["latitude"] for r in dep_rows]
    lons = [r["longitude"] for r in dep_rows]
    if len(set(zip(lats, lons, strict=True))) == 1:
        spatial: dict[str, Any] = {"type": "Point", "coordinates": [lons[0], lats[0]]}
    else:
        w, e, s, n = min(lons), max(lons), min(lats), max(lats)
        spatial = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    starts = [r["deploymentStart"] for r in dep_rows]
    ends = [r["deploymentEnd"] for r in dep_rows]
    title = cfg.package.get("title") or cfg.project["title"]
    package: dict[str, Any] = {
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8", "schema": SCHEMAS[name]}
                      for name in ("deployments", "media", "observations")],
        "profile": PROFILE,
        "name": cfg.package.get("name") or (re.sub(r"[^a-z0-9._-]+", "-", str(title).lower()).strip("-") or
                                            "moevit-camtrap-dp"),
        "created": _iso(now.astimezone(_UTC).replace(microsecond=0)),
        "title": title,
        "contributors": cfg.contributors,
        "sources": [{"title": "moevit", "version": fingerprint}],
        "project": {**cfg.project, "observationLevel": ["media", "event"]},
        "spatial": spatial,
        "temporal": {"start": min(x.date() for x in starts).isoformat(),
                     "end": max(x.date() for x in ends).isoformat()},
        "taxonomic": taxonomic,
    }
    for k in ("description", "licenses", "keywords", "bibliographicCitation", "coordinatePrecision"):
        if k in cfg.package:
            package[k] = cfg.package[k]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "deployments.csv", _csv(DEPLOYMENT_COLUMNS, dep_rows))
    write_bytes_atomic(out / "media.csv", _csv(MEDIA_COLUMNS, media_rows))
    write_bytes_atomic(out / "observations.csv", _csv(OBSERVATION_COLUMNS, obs_rows))
    write_bytes_atomic(out / "datapackage.json", (json.dumps(package, indent=2, ensure_ascii=False) + "\n").encode())
    return {"deployments": len(dep_rows), "media": len(media_rows), "observations": len(obs_rows),
            "events": len(by_event), "model": fingerprint, "out": str(out)}
