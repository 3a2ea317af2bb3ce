"""Validate a Camtrap DP package with frictionless, offline.

A Camtrap DP package names its profile and table schemas by URL (and the profile ``$ref``s the Data Package
profile and GeoJSON). The stored copies in ``../shared/standards/`` (see its SOURCES.md) stand in for those URLs:
frictionless's HTTP session gets a transport that answers exactly these URLs from the local files and refuses
every other one, so a validation can never fetch anything. Where the folder is absent the caller skips, saying why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

STANDARDS = Path(__file__).resolve().parents[1].parent / "shared" / "standards"

_CAMTRAP = re.compile(r"https://raw\.githubusercontent\.com/tdwg/camtrap-dp/(1\.0(?:\.[12])?)/([a-z-]+\.json)\Z")
_EXT = {
    "https://specs.frictionlessdata.io/schemas/data-package.json": "ext/data-package.json",
    "https://frictionlessdata.io/schemas/data-package.json": "ext/data-package.json",
    "http://json.schemastore.org/geojson.json": "ext/geojson.json",
    "https://json.schemastore.org/geojson.json": "ext/geojson.json",
}


def missing_reason() -> str | None:
    """Why offline validation cannot run here (None when it can)."""
    if not (STANDARDS / "camtrap-dp" / "1.0.2" / "camtrap-dp-profile.json").is_file():
        return f"{STANDARDS} (the stored Camtrap DP schemas, shared/standards/) is absent: no offline validation"
    return None


def local_file(url: str) -> Path | None:
    """The stored copy of a standard's URL, or None."""
    m = _CAMTRAP.match(url)
    if m:
        return STANDARDS / "camtrap-dp" / m[1] / m[2]
    rel = _EXT.get(url)
    return STANDARDS / rel if rel else None


class OfflineFetch(RuntimeError):
    """A validation tried to fetch a URL that has no stored copy."""


def _session() -> Any:
    import requests
    from requests.adapters import BaseAdapter

    class _Local(BaseAdapter):
        def send(self, request, **kwargs):  # noqa: ANN001, ANN003, ANN201 - requests' adapter interface
            path = local_file(request.url)
            if path is None or not path.is_file():
                raise OfflineFetch(f"offline validation: no stored copy of {request.url}")
            resp = requests.Response()
            resp.status_code = 200
            resp.url = request.url
            resp.request = request
            resp.raw = open(path, "rb")  # noqa: SIM115 - the response owns it, as requests' own adapter does
            resp.headers["Content-Type"] = "application/json"
            return resp

        def close(self) -> None:
            pass

    s = requests.Session()
    s.mount("http://", _Local())
    s.mount("https://", _Local())
    return s


def validate_package(folder: Path) -> list[str]:
    """frictionless's verdict on ``folder/datapackage.json`` (the descriptor against the profile it names, each
    table against its schema: types, constraints, keys), offline: one line per error, empty when valid."""
    from frictionless import FrictionlessException, Package, system

    with system.use_context(http_session=_session()):
        try:
            report = Package(str(folder / "datapackage.json")).validate()
        except FrictionlessException as e:  # e.g. a profile that cannot be resolved (Camtrap DP 1.0's $ref)
            return [f"{e.error.type}: {e.error.note}"]
    out = [f"{e.type}: {e.note}" for e in report.errors]
    for task in report.tasks:
        out += [f"{task.name}: {e.type}: {e.message}" for e in task.errors]
    return out
