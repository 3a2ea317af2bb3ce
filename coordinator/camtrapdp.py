"""Camtrap DP 1.0.2 export of moevit results: ``datapackage.json``, ``deployments.csv``, ``media.csv``,
``observations.csv`` (https://camtrap-dp.tdwg.org, the TDWG standard read by GBIF, camtrapR and camtrapdp).

Inputs: one or more MegaDetector results files written by ``moe-coordinator --out results.json`` (same model) and
a deployments file (``examples/deployments.yaml``, documented in ``docs/outputs.md``) saying where each camera
stood, when, and which image files it took. Each image becomes a media row and a media-level observation; each
sequence (images of one deployment no more than ``gap`` seconds apart) becomes an event-level observation labelled
by the confidence-weighted majority of its frames. A time that is not a capture time (the file's modification
time, the fallback of a missing or reset camera clock) is never exported: such images are left out with a warning,
or, for a reset clock, corrected by the deployment's ``clockReset``.
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
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from moevit.coordinator.fieldmeta import (
    DEFAULT_SEQUENCE_GAP_S,
    SOURCE_EXIF_ORIGINAL,
    SequenceFrame,
    assign_sequences,
    parse_exif_datetime,
    parse_iso,
    sequence_label,
)
from moevit.coordinator.results import fingerprint_of, write_bytes_atomic

from moevit.kinds import class_kinds

__all__ = [
    "DEPLOYMENT_COLUMNS",
    "MEDIA_COLUMNS",
    "OBSERVATION_COLUMNS",
    "PROFILE",
    "Deployment",
    "DeploymentsFile",
    "ExportError",
    "export_camtrapdp",
    "package_name",
    "load_deployments",
    "read_results",
]

CAMTRAP_DP_VERSION = "1.0.2"  # 1.0's profile holds a broken $ref (fixed in 1.0.1); camtrapdp for R reads 1.0.2
_BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}/"
PROFILE = _BASE + "camtrap-dp-profile.json"
SCHEMAS = {name: f"{_BASE}{name}-table-schema.json" for name in ("deployments", "media", "observations")}

# The standard's columns, in the order of its table schemas (Camtrap DP 1.0.2; the same in 1.0 and 1.0.1).
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
# baitUse is a boolean in 1.0; the values of the 0.x vocabulary are read too: "none" is false, the others true
# with the kind kept as the deployment tag bait:<kind>
BAIT_USE_0X = ("none", "scent", "food", "visual", "acoustic", "other")
FEATURE_TYPES = ("roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass", "roadOverpass", "roadBridge",
                 "culvert", "burrow", "nestSite", "carcass", "waterSource", "fruitingTree")

# deployments.yaml: keys of a deployment besides the Camtrap DP columns it may set directly
_DEPLOYMENT_EXTRA = ("site", "files", "timezone", "clockReset")
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


@dataclass(frozen=True)
class Deployment:
    id: str
    site: str | None
    prefixes: tuple[str, ...]
    tz: dt.tzinfo | None
    columns: Mapping[str, Any] = field(default_factory=dict)  # Camtrap DP columns given in the file
    tags: tuple[str, ...] = ()  # deploymentTags the file's values imply (bait:<kind>)
    # (what a reset camera clock stamped on a frame (naive), the true time of that frame (aware))
    clock_reset: tuple[dt.datetime, dt.datetime] | None = None


@dataclass(frozen=True)
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
        tags: list[str] = []
        for col, value in d.items():
            if col in _DEPLOYMENT_EXTRA or value is None:
                continue
            kind = _DEPLOYMENT_TYPES.get(col)
            if col == "baitUse":
                if not isinstance(value, bool) and value not in BAIT_USE_0X:
                    raise _fail(file, f"{key}.baitUse", f"expected true or false (or one of the 0.x values "
                                f"{', '.join(BAIT_USE_0X)}), got {value!r}")
                columns[col] = value if isinstance(value, bool) else value != "none"
                if isinstance(value, str) and value != "none":
                    tags.append(f"bait:{value}")
            elif col == "featureType":
                if value not in FEATURE_TYPES:
                    import difflib

                    close = difflib.get_close_matches(str(value), FEATURE_TYPES, n=1)
                    raise _fail(file, f"{key}.featureType", f"{value!r} is not a Camtrap DP 1.0 feature type ("
                                f"{', '.join(FEATURE_TYPES)})" + (f"; did you mean {close[0]!r}?" if close else ""))
                columns[col] = value
            elif kind is None:
                columns[col] = str(value)
            elif kind[0] == "datetime":
                columns[col] = _datetime(value, dtz, file, f"{key}.{col}")[0]
            else:
                columns[col] = _typed(value, kind[0], kind[1], kind[2], file, f"{key}.{col}")
        deployments.append(Deployment(name, site, prefixes, dtz, columns, tuple(tags),
                                      _clock_reset(d.get("clockReset"), dtz, file, f"{key}.clockReset")))
    package = {k: doc[k] for k in ("name", "title", "description", "licenses", "keywords", "bibliographicCitation",
                                   "coordinatePrecision") if k in doc}
    public = doc.get("filePublic", False)
    if not isinstance(public, bool):
        raise _fail(file, "filePublic", "expected true or false")
    base = doc.get("mediaBase", "")
    if not isinstance(base, str):
        raise _fail(file, "mediaBase", "expected a URL or relative path prefix")
    if base and not base.startswith(("https://", "http://")) and not re.fullmatch(r"[^./~\\:]((?!\.\.).)*/", base):
        raise _fail(file, "mediaBase", f"{base!r}: Camtrap DP's filePath is a URL (published images) or a path "
                    "inside the package: give the URL the images are published under (https://.../) or a folder "
                    "inside the package ending in / (e.g. media/) and copy the images there")
    return DeploymentsFile(file, project, [dict(c) for c in contributors], deployments, tz, package, public, base)


def _clock_reset(value: Any, tz: dt.tzinfo | None, file: str, key: str) -> tuple[dt.datetime, dt.datetime] | None:
    """``clockReset: {cameraTime: what the reset camera stamped on a frame, actualTime: that frame's true time}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(file, key, "expected {cameraTime: <time the camera stamped>, actualTime: <true time of that "
                    "frame>}")
    _check_keys(value, file, key, ("cameraTime", "actualTime"), ("cameraTime", "actualTime"))
    camera = value["cameraTime"]
    camera = parse_exif_datetime(camera) if isinstance(camera, str) else camera
    if isinstance(camera, dt.datetime):
        camera = camera.replace(tzinfo=None)  # a camera clock has no zone
    else:
        raise _fail(file, f"{key}.cameraTime", f"expected the camera's time like 2000-01-01T00:05:00, got "
                    f"{value['cameraTime']!r}")
    actual = _datetime(value["actualTime"], tz, file, f"{key}.actualTime")[0]
    return camera, actual


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
#
# The export runs in stages, each a function of the previous stages' values that returns new values and changes
# none of its inputs: results -> images (which deployment took each) -> capture times -> events -> media rows,
# observation rows, deployment rows -> datapackage.json. ``export_camtrapdp`` chains them and writes the files.


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
    "no_exif_time": "no EXIF capture time",
    "exif_time_unparseable": "EXIF capture time unreadable",
    "clock_before_2000": "camera clock before 2000 (reset)",
    "clock_in_future": "camera clock in the future",
    "mtime_implausible": "the file's modification time is implausible too",
    "no_time": "no timestamp at all",
}
# flags of a camera clock that ran but was wrong: its raw EXIF times still order the frames of a burst
_CLOCK_FLAGS = ("clock_before_2000", "clock_in_future")
_EXIF_SOURCES = ("exif:DateTimeOriginal", "exif:DateTime")
# media.filePath (Camtrap DP 1.0.2 media table schema): a URL, or a path inside the package without ./ ~ or ..
_FILE_PATH = re.compile(r"^(?=^[^./~])(^((?!\.{2}).)*$).*$")
_NAME = re.compile(r"[a-z0-9._/-]+")  # Data Package name
# Latin letters NFKD does not decompose into a base letter and marks
_TRANSLIT = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D",
                           "ħ": "h", "Ħ": "H", "ı": "i", "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
                           "þ": "th", "Þ": "TH"})


def package_name(title: str) -> str:
    """A Data Package ``name`` (lower case, url-usable) from a title: letters transliterated to ASCII (NFKD, accents
    dropped: "Białowieża Forest" -> "bialowieza-forest"), never cut; a title with no Latin letters or digits at all
    gets ``moevit-camtrap-dp-<hash>``."""
    ascii_ = unicodedata.normalize("NFKD", title.translate(_TRANSLIT)).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9._-]+", "-", ascii_.lower()).strip("-.")
    return name or f"moevit-camtrap-dp-{hashlib.sha1(title.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class ExportImage:
    """One image of the results, with the deployment that took it."""

    file: str
    entry: Mapping[str, Any]  # the MegaDetector image entry (read, never changed)
    deployment: Deployment
    classified_at: dt.datetime | None


@dataclass(frozen=True)
class CaptureTimes:
    """The capture time of every exported image, and what the time stage found."""

    stamp: Mapping[str, dt.datetime]  # file -> timestamp (aware); only images that are exported
    corrected: frozenset[str]  # files whose reset clock was corrected by the deployment's clockReset
    dropped: Mapping[str, str]  # file -> why it has no capture time (not exported)
    issues: Mapping[str, bool]  # deploymentID -> timestampIssues


def check_topologies(topologies: Sequence[str | os.PathLike[str]], fingerprint: str) -> dict[str, str] | None:
    """Site name -> topology file, for checking the deployments' sites; refuses a topology of another model."""
    if not topologies:
        return None
    from moevit.deploy.topology import TopologyError, load_topology

    sites: dict[str, str] = {}
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
    return sites


def deployment_prefixes(cfg: DeploymentsFile) -> dict[str, tuple[str, ...]]:
    """deploymentID -> the path prefixes of its files (``files:``, else ``<id>/`` and ``<site>/``); empty for the
    one deployment of a file that has only one and no ``files:`` (it takes every image)."""
    deps = cfg.deployments
    if len(deps) == 1 and not deps[0].prefixes:
        return {deps[0].id: ()}
    return {d.id: d.prefixes or tuple(dict.fromkeys(p for p in (f"{d.id}/", f"{d.site}/" if d.site else None) if p))
            for d in deps}


def gather_images(docs: Sequence[Mapping[str, Any]], paths: Sequence[str], cfg: DeploymentsFile
                  ) -> list[ExportImage]:
    """Every image of the results with the deployment that took it (the longest matching prefix)."""
    prefixes = deployment_prefixes(cfg)
    single = cfg.deployments[0] if len(cfg.deployments) == 1 and not prefixes[cfg.deployments[0].id] else None
    seen: dict[str, str] = {}
    images: list[ExportImage] = []
    unmatched: list[str] = []
    for doc, path in zip(docs, paths, strict=True):
        completed = parse_iso(doc["info"].get("moevit_completion_time"))
        for im in doc["images"]:
            file = im["file"]
            if file in seen:
                raise ExportError(f"{file} appears in {seen[file]} and {path}: export results of distinct image "
                                  "sets (or one results file)")
            seen[file] = path
            owner = single
            if owner is None:
                best = max(((len(p), i) for i, d in enumerate(cfg.deployments) for p in prefixes[d.id]
                            if file.startswith(p)), default=None)
                if best is None:
                    unmatched.append(file)
                    continue
                owner = cfg.deployments[best[1]]
            images.append(ExportImage(file, im, owner, completed))
    if unmatched:
        raise ExportError(f"{cfg.path}: {len(unmatched)} image(s) belong to no deployment (e.g. "
                          f"{', '.join(unmatched[:3])}); give each deployment the folder/prefix of its files with "
                          "`files:` (docs/outputs.md)")
    return images


def capture_times(images: Sequence[ExportImage], cfg: DeploymentsFile,
                  warn: Callable[[str], None] = lambda s: None) -> CaptureTimes:
    """Timestamps from trusted EXIF clocks, and from reset clocks the deployment's ``clockReset`` corrects.

    A file time (the fallback of an image whose camera clock was missing or wrong) is not a capture time: such an
    image is dropped, with one warning per deployment saying how many and why."""
    stamp: dict[str, dt.datetime] = {}
    corrected: set[str] = set()
    dropped: dict[str, str] = {}
    assumed_utc: set[str] = set()
    issues = {d.id: bool(d.columns.get("timestampIssues", False)) for d in cfg.deployments}
    for im in images:
        d, e = im.deployment, im.entry
        flags = list(e.get("moevit_time_flags") or [])
        source = e.get("moevit_time_source")
        t = parse_iso(e.get("datetime"))
        if "datetime" not in e and source is None:
            raise ExportError(f"{im.file}: no capture time in the results (results of a --data run, or made by "
                              "an older moevit); Camtrap DP needs a timestamp for every media file")
        if flags or (source is not None and source not in _EXIF_SOURCES) or t is None:
            issues[d.id] = True
            raw = parse_exif_datetime(e.get("moevit_exif_datetime"))
            if d.clock_reset is not None and raw is not None and any(f in _CLOCK_FLAGS for f in flags):
                camera, actual = d.clock_reset
                stamp[im.file] = (actual.replace(tzinfo=None) + (raw - camera)).replace(tzinfo=actual.tzinfo)
                corrected.add(im.file)
            else:
                dropped[im.file] = ", ".join(_FLAG_TEXT.get(f, f) for f in flags) or "no trusted capture time"
            continue
        if t.tzinfo is None:
            if d.tz is None:
                assumed_utc.add(d.id)
            t = t.replace(tzinfo=d.tz or _UTC)
        stamp[im.file] = t
    for dep_id in sorted(assumed_utc):
        issues[dep_id] = True
        warn(f"deployment {dep_id}: no timezone in {cfg.path}; camera times written as UTC and timestampIssues "
             "set (add timezone: \"+HH:MM\")")
    for d in cfg.deployments:
        mine = [im for im in images if im.deployment is d and im.file in dropped]
        if mine:
            reasons = ", ".join(f"{n}: {why}" for why, n in sorted(Counter(dropped[im.file] for im in mine).items()))
            hint = ("" if d.clock_reset is not None else "; frames of a reset camera clock can be kept by giving "
                    "the deployment clockReset: {cameraTime: <what the camera stamped>, actualTime: <the true "
                    "time of that frame>}")
            warn(f"deployment {d.id}: {len(mine)} image(s) left out: their only time is the file's modification "
                 f"time, not a capture time ({reasons}){hint}")
    return CaptureTimes(stamp, frozenset(corrected), dropped, issues)


def event_frames(images: Sequence[ExportImage], times: CaptureTimes, gap_s: float
                 ) -> dict[str, SequenceFrame]:
    """Events: classified exported images, per deployment, in sequences of at most ``gap_s`` between frames.

    Frames whose reset clock was corrected are sequenced apart (``<deploymentID>~clock``) on their own camera
    times, so they never share an event with frames of a trusted clock."""
    items = []
    for im in images:
        if im.file in times.stamp and not im.entry.get("failure"):
            group = f"{im.deployment.id}~clock" if im.file in times.corrected else im.deployment.id
            items.append((im.file, group, times.stamp[im.file].astimezone(_UTC)))
    return assign_sequences(items, gap_s)


def _classifications(entry: Mapping[str, Any]) -> list[tuple[int, float]]:
    """The image's ``[(class, p), ...]``: its detection's classifications, or, for an image the blank filter
    emptied (``detections: []``), the ones it kept in ``moevit_classifications``."""
    dets = entry.get("detections") or []
    pairs = dets[0].get("classifications") if dets else entry.get("moevit_classifications")
    return [(int(c), float(p)) for c, p in pairs or []]


def _observation_type(entry: Mapping[str, Any], kinds: Mapping[int, str], top: int | None) -> str:
    if entry.get("detections") == []:
        return "blank"
    return kinds.get(top, "animal") if top is not None else "unknown"


@dataclass(frozen=True)
class Naming:
    """How classes become Camtrap DP values: scientific names and observation types."""

    categories: Mapping[str, str]
    descriptions: Mapping[str, str]
    kinds: Mapping[int, str]  # class index -> blank | human | vehicle (classes that are not animals)
    classified_by: str

    def scientific(self, cid: int) -> str | None:
        if cid in self.kinds:
            return None  # blank, human and vehicle are observation types, not taxa
        key = str(cid)
        return str(self.descriptions.get(key) or self.categories.get(key) or key)


def naming_of(doc: Mapping[str, Any], fingerprint: str, warn: Callable[[str], None] = lambda s: None) -> Naming:
    categories: dict[str, str] = dict(doc.get("classification_categories") or {})
    descriptions: dict[str, str] = dict(doc.get("classification_category_descriptions") or {})
    if not descriptions:
        warn("the results carry no scientific names (run moe-coordinator with --taxa taxa.csv): scientificName "
             "holds the class names, which GBIF and camtrapdp will not match to a taxon")
    kinds = {int(c): k for c, k in class_kinds(categories).items()}
    return Naming(categories, descriptions, kinds, f"moevit {fingerprint}")


def media_rows(images: Sequence[ExportImage], times: CaptureTimes, cfg: DeploymentsFile) -> list[dict[str, Any]]:
    """One media row per exported image, by deployment and time."""
    rows = []
    for im in sorted((im for im in images if im.file in times.stamp),
                     key=lambda im: (im.deployment.id, times.stamp[im.file], im.file)):
        e = im.entry
        comments = []
        if im.file in times.corrected:
            comments.append(f"camera clock reset ({e.get('moevit_exif_datetime')}): timestamp corrected by the "
                            "deployment's clockReset")
        if e.get("failure"):
            comments.append(f"not classified: {e['failure']}")
        exif = {}
        cam = e.get("moevit_camera") or {}
        for k, name in (("make", "Make"), ("model", "Model"), ("serial", "BodySerialNumber")):
            if cam.get(k):
                exif[name] = cam[k]
        if e.get("moevit_time_source") == SOURCE_EXIF_ORIGINAL and e.get("datetime"):
            exif["DateTimeOriginal"] = parse_iso(e["datetime"]).strftime("%Y:%m:%d %H:%M:%S")  # type: ignore[union-attr]
        elif e.get("moevit_exif_datetime"):
            exif["DateTimeOriginal"] = str(e["moevit_exif_datetime"])
        suffix = PurePosixPath(im.file).suffix.lower()
        rows.append({
            "mediaID": _media_id(im.file), "deploymentID": im.deployment.id,
            "captureMethod": cfg.project["captureMethod"][0], "timestamp": times.stamp[im.file],
            "filePath": file_path(cfg.media_base, im.file, cfg.path), "filePublic": cfg.file_public,
            "fileName": PurePosixPath(im.file).name,
            "fileMediatype": _MEDIATYPES.get(suffix, "image/" + (suffix[1:] or "jpeg")),
            "exifData": json.dumps(exif, sort_keys=True) if exif else None,
            "mediaComments": "; ".join(comments) or None,
        })
    return rows


def file_path(media_base: str, file: str, source: str = "") -> str:
    """``media.filePath``: ``mediaBase`` + the image's path; a URL (percent-encoded) for published images, else a
    path inside the package (the standard's reading of a relative path)."""
    if _is_url(media_base):
        return media_base.rstrip("/") + "/" + urllib.parse.quote(file, safe="/")
    path = media_base + file
    if not _FILE_PATH.match(path):
        raise ExportError(f"{source}: media file {file!r} cannot be a Camtrap DP filePath inside the package "
                          "(no leading '.', '/' or '~', no '..'): set mediaBase to the URL where the images are "
                          "published")
    return path


def _is_url(s: str) -> bool:
    return s.startswith(("https://", "http://"))


def observation_rows(images: Sequence[ExportImage], times: CaptureTimes, frames: Mapping[str, SequenceFrame],
                     naming: Naming) -> list[dict[str, Any]]:
    """One media-level observation per exported image, then one event-level observation per event."""
    rows: list[dict[str, Any]] = []
    by_event: dict[str, list[ExportImage]] = {}
    for im in sorted((im for im in images if im.file in times.stamp),
                     key=lambda im: (im.deployment.id, times.stamp[im.file], im.file)):
        e, t, mid = im.entry, times.stamp[im.file], _media_id(im.file)
        obs: dict[str, Any] = {"observationID": f"{mid}_1", "deploymentID": im.deployment.id, "mediaID": mid,
                               "eventStart": t, "eventEnd": t, "observationLevel": "media"}
        if e.get("failure"):
            obs.update(observationType="unclassified", observationComments=f"moevit: {e['failure']}")
        else:
            cls = _classifications(e)
            top = cls[0] if cls else None
            event = frames[im.file].seq_id
            by_event.setdefault(event, []).append(im)
            tags = ["degraded:true"] if e.get("moevit_degraded") else []
            kind = _observation_type(e, naming.kinds, top[0] if top else None)
            obs.update(eventID=event, observationType=kind,
                       scientificName=naming.scientific(top[0]) if top and kind == "animal" else None,
                       classificationMethod="machine", classifiedBy=naming.classified_by,
                       classificationTimestamp=im.classified_at,
                       classificationProbability=float(top[1]) if top else None,
                       observationTags="|".join(tags) or None)
        rows.append(obs)
    for event, members in by_event.items():
        members = sorted(members, key=lambda im: frames[im.file].frame_num)
        rows.append(_event_row(event, members, times, naming))
    return rows


def _event_row(event: str, members: Sequence[ExportImage], times: CaptureTimes, naming: Naming) -> dict[str, Any]:
    """An event's label: the confidence-weighted majority of its non-blank frames (a burst where one frame shows an
    animal is an animal event); blank when every frame is."""
    shown = [im for im in members if im.entry.get("detections") != []]
    label = sequence_label([_classifications(im.entry) for im in shown]) if shown else None
    kind = "blank" if label is None else naming.kinds.get(label[0], "animal")
    if kind == "blank" and label is None:
        label = sequence_label([_classifications(im.entry) for im in members])
    tags = [f"frames:{len(members)}"] + (["degraded:true"] if any(m.entry.get("moevit_degraded") for m in members)
                                         else [])
    return {
        "observationID": f"{event}_event", "deploymentID": members[0].deployment.id, "eventID": event,
        "eventStart": times.stamp[members[0].file], "eventEnd": times.stamp[members[-1].file],
        "observationLevel": "event", "observationType": kind,
        "scientificName": naming.scientific(label[0]) if label is not None and kind == "animal" else None,
        "classificationMethod": "machine", "classifiedBy": naming.classified_by,
        "classificationTimestamp": max((m.classified_at for m in members if m.classified_at), default=None),
        "classificationProbability": round(label[1], 4) if label is not None else None,
        "observationTags": "|".join(tags),
        "observationComments": f"moevit: confidence-weighted majority of {len(members)} frame(s)",
    }


def deployment_rows(images: Sequence[ExportImage], times: CaptureTimes, cfg: DeploymentsFile,
                    warn: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """One row per deployment: the file's columns, completed from its exported images' times and cameras."""
    rows = []
    for d in cfg.deployments:
        own = [im for im in images if im.deployment is d]
        mine = [times.stamp[im.file] for im in own if im.file in times.stamp]
        row: dict[str, Any] = {"deploymentID": d.id, **d.columns}
        for col, pick in (("deploymentStart", min), ("deploymentEnd", max)):
            if col not in row:
                if not mine:
                    raise _fail(cfg.path, f"deployments.{d.id}", f"no images with a capture time and no {col}: give "
                                f"{col} (ISO 8601 with offset)")
                row[col] = pick(mine)
        if row["deploymentEnd"] < row["deploymentStart"]:
            raise _fail(cfg.path, f"deployments.{d.id}", "deploymentEnd is before deploymentStart")
        outside = [t for t in mine if not row["deploymentStart"] <= t <= row["deploymentEnd"]]
        if outside:
            warn(f"deployment {d.id}: {len(outside)} image(s) lie outside deploymentStart..deploymentEnd")
        cameras = [im.entry.get("moevit_camera") or {} for im in own]
        serials = {c["serial"] for c in cameras if c.get("serial")}
        makes = {(c.get("make"), c.get("model")) for c in cameras if c.get("make") or c.get("model")}
        if "cameraID" not in row and len(serials) == 1:  # images without EXIF do not count against it
            row["cameraID"] = next(iter(serials))
        if "cameraModel" not in row and len(makes) == 1:
            row["cameraModel"] = "-".join(x for x in next(iter(makes)) if x)
        if "locationName" not in row and d.site:
            row["locationName"] = d.site
        row["timestampIssues"] = times.issues[d.id]
        tags = [x for x in (row.get("deploymentTags"), *d.tags, f"site:{d.site}" if d.site else None) if x]
        if tags:
            row["deploymentTags"] = "|".join(tags)
        rows.append(row)
    return rows


def datapackage(cfg: DeploymentsFile, dep_rows: Sequence[Mapping[str, Any]], obs_rows: Sequence[Mapping[str, Any]],
                naming: Naming, fingerprint: str, now: dt.datetime) -> dict[str, Any]:
    """``datapackage.json``: Camtrap DP 1.0.2 profile and table schemas, and the package's metadata."""
    used = sorted({r["scientificName"] for r in obs_rows if r.get("scientificName")})
    common = {naming.scientific(int(cid)): name for cid, name in naming.categories.items()
              if int(cid) not in naming.kinds}
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
    title = cfg.package.get("title") or cfg.project["title"]
    package: dict[str, Any] = {
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8", "schema": SCHEMAS[name]}
                      for name in ("deployments", "media", "observations")],
        "profile": PROFILE,
        "name": cfg.package.get("name") or package_name(str(title)),
        "created": _iso(now.astimezone(_UTC).replace(microsecond=0)),
        "title": title,
        "contributors": [dict(c) for c in cfg.contributors],
        "sources": [{"title": "moevit", "version": fingerprint}],
        "project": {**cfg.project, "observationLevel": ["media", "event"]},
        "spatial": spatial,
        "temporal": {"start": min(r["deploymentStart"] for r in dep_rows).date().isoformat(),
                     "end": max(r["deploymentEnd"] for r in dep_rows).date().isoformat()},
        "taxonomic": taxonomic,
    }
    for k in ("description", "licenses", "keywords", "bibliographicCitation", "coordinatePrecision"):
        if k in cfg.package:
            package[k] = cfg.package[k]
    return package


def export_camtrapdp(results: Sequence[str | os.PathLike[str]], deployments: str | os.PathLike[str] | DeploymentsFile,
                     out_dir: str | os.PathLike[str], *, topologies: Sequence[str | os.PathLike[str]] = (),
                     gap_s: float | None = None, now: dt.datetime | None = None,
                     warn: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write the package into ``out_dir``; returns counts (deployments, media, observations, events, dropped).

    ``deployments`` is a deployments file or one already read with :func:`load_deployments` (left unchanged)."""
    docs, fingerprint = read_results(results)
    sites = check_topologies(topologies, fingerprint)
    cfg = deployments if isinstance(deployments, DeploymentsFile) else load_deployments(deployments, sites=sites)
    if gap_s is None:
        gaps = {float(d["info"].get("moevit_sequence_gap_s", DEFAULT_SEQUENCE_GAP_S)) for d in docs}
        gap_s = gaps.pop() if len(gaps) == 1 else DEFAULT_SEQUENCE_GAP_S
    images = gather_images(docs, [d["_path"] for d in docs], cfg)
    times = capture_times(images, cfg, warn)
    frames = event_frames(images, times, gap_s)
    naming = naming_of(docs[0], fingerprint, warn)
    media = media_rows(images, times, cfg)
    observations = observation_rows(images, times, frames, naming)
    deps = deployment_rows(images, times, cfg, warn)
    package = datapackage(cfg, deps, observations, naming, fingerprint, now or dt.datetime.now(_UTC))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not _is_url(cfg.media_base):
        absent = sum(not (out / m["filePath"]).is_file() for m in media)
        if absent:
            warn(f"media.filePath is a path inside the package (Camtrap DP reads a relative path so): {absent} of "
                 f"{len(media)} image(s) are not under {out}/ yet; copy them there keeping their folders"
                 + (f" (under {cfg.media_base})" if cfg.media_base else "")
                 + ", or set mediaBase to the URL where the images are published")
    write_bytes_atomic(out / "deployments.csv", _csv(DEPLOYMENT_COLUMNS, deps))
    write_bytes_atomic(out / "media.csv", _csv(MEDIA_COLUMNS, media))
    write_bytes_atomic(out / "observations.csv", _csv(OBSERVATION_COLUMNS, observations))
    write_bytes_atomic(out / "datapackage.json", (json.dumps(package, indent=2, ensure_ascii=False) + "\n").encode())
    return {"deployments": len(deps), "media": len(media), "observations": len(observations),
            "events": sum(o["observationLevel"] == "event" for o in observations), "dropped": len(times.dropped),
            "model": fingerprint, "out": str(out)}
