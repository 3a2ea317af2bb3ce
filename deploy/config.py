"""Strict reading of the deployment's YAML and JSON files, and the one set of value checkers they share.

Every problem found in a file is a :class:`ConfigError` (a ``ValueError``) whose message names the file, the key
path inside it (``sites.pi-north.device.gflops``, ``links[1].between[0]``) and what was expected. The topology,
the placement, the sweep, the routing statistics, the deployments file and the training config all read through
here, so they refuse the same mistakes with the same words.

YAML is read with a SafeLoader subclass only (never ``yaml.load``): Python tags cannot construct objects,
anchors/aliases are refused outright (no "billion laughs"), duplicate mapping keys are refused, and files are
capped at :data:`MAX_FILE_BYTES`. JSON refuses duplicate keys too (``json`` would silently keep the last).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import yaml

__all__ = [
    "MAX_FILE_BYTES",
    "ConfigError",
    "check_keys",
    "describe",
    "fail",
    "index",
    "integer",
    "join",
    "mapping",
    "non_empty_list",
    "number",
    "parse_yaml_text",
    "read_json",
    "read_text",
    "read_yaml",
]

# A config file is a few kilobytes; the cap keeps a wrong path (a checkpoint, a log) or a hostile file from being
# parsed into memory at all. Readers of bigger formats (routing statistics) pass their own cap.
MAX_FILE_BYTES = 1 << 20


class ConfigError(ValueError):
    """A problem in a config file: ``str(err)`` is ``"<file>: <key path>: <problem>"``.

    ``file``, ``key_path`` and ``problem`` are also attributes, so callers and tests need not parse the text.
    """

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        # The three parts are the exception's args so the error pickles (the simulator runs under ray).
        super().__init__(str(file), key_path, problem)
        self.file = str(file)
        self.key_path = key_path
        self.problem = problem

    @property
    def key(self) -> str:
        """Same as ``key_path`` (the sweep reader's older name for it)."""
        return self.key_path

    def __str__(self) -> str:
        where = f"{self.file}: {self.key_path}" if self.key_path else self.file
        return f"{where}: {self.problem}"


def fail(file: str, key: str, problem: str) -> NoReturn:
    raise ConfigError(file, key, problem)


def describe(value: Any) -> str:
    """How a wrong value reads in an error message."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def join(key: str, sub: object) -> str:
    return f"{key}.{sub}" if key else str(sub)


# --------------------------------------------------------------------------------------------------- reading


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> NoReturn:
    tag = str(node.tag).replace("tag:yaml.org,2002:", "!!", 1)
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"YAML tag {tag!r} is not allowed: config files are plain YAML "
        "(mappings, lists, strings, numbers, booleans, null)",
        node.start_mark,
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses anchors, aliases, merge keys, unknown tags and duplicate mapping keys."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        # Refusing aliases at compose time means an alias bomb never expands: no node graph, no construction.
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in config files; write the value out", event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors (&name) are not allowed in config files; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "merge keys (<<) are not allowed in config files", key_node.start_mark
                    )
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"mapping key {describe(key)} is not a plain value", key_node.start_mark
                    ) from None
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first defined at line {first.line + 1}); "
                        "YAML would silently keep only the last one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# Any tag without a safe constructor (``!!python/object``, ``!custom``) lands here instead of a generic error.
_StrictLoader.add_constructor(None, _refuse_tag)


def parse_yaml_text(text: str, file: str) -> Any:
    """One YAML document from ``text`` with the strict safe loader; ``file`` names it in errors."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(p for p in (e.context, e.problem) if p)
        fail(file, where, f"invalid YAML: {problem}")
    except yaml.YAMLError as e:
        fail(file, "", f"invalid YAML: {e}")
    except RecursionError:
        fail(file, "", "invalid YAML: nested too deeply")
    finally:
        loader.dispose()


def read_text(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES, what: str = "a config file",
              missing_hint: str = "") -> str:
    """The UTF-8 text of ``path``, at most ``max_bytes``; every problem is a ConfigError naming the file."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        fail(file, "", "file not found" + (f" ({missing_hint})" if missing_hint else ""))
    except IsADirectoryError:
        fail(file, "", f"is a directory, expected {what}")
    except OSError as e:
        fail(file, "", f"cannot read: {e.strerror or e}")
    if len(raw) > max_bytes:
        fail(file, "", f"file larger than {max_bytes} bytes; not {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(file, "", f"not UTF-8 text (byte {e.start})")


def read_yaml(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Read one YAML document from ``path`` with the strict safe loader; every problem is a ConfigError."""
    return parse_yaml_text(read_text(path, max_bytes=max_bytes, what="a YAML file"), str(path))


def _no_duplicates(file: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                fail(file, str(k), f"duplicate key {k!r}; JSON readers would silently keep only the last one")
            out[k] = v
        return out

    return hook


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_FILE_BYTES, what: str = "a JSON file",
              missing_hint: str = "") -> Any:
    """Read one JSON document from ``path``; duplicate keys are refused; every problem is a ConfigError."""
    file = str(path)
    text = read_text(path, max_bytes=max_bytes, what=what, missing_hint=missing_hint)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(file))
    except json.JSONDecodeError as e:
        fail(file, "", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")
    except RecursionError:
        fail(file, "", "not valid JSON: nested too deeply")


# ---------------------------------------------------------------------------------------- value checkers


def mapping(value: Any, file: str, key: str, what: str = "a mapping") -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        fail(file, key or "top level", f"expected {what}, got {describe(value)}")
    return value


def check_keys(d: Mapping[Any, Any], file: str, key: str, required: Sequence[str] = (),
               optional: Sequence[str] = ()) -> None:
    """Refuse keys outside ``required`` + ``optional`` (with a "did you mean") and missing required keys."""
    allowed = (*required, *(k for k in optional if k not in required))
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            fail(file, join(key, k), f"unknown key {k!r} (allowed: {', '.join(allowed)}){hint}")
    for k in required:
        if k not in d:
            fail(file, join(key, k), f"missing required key {k!r}")


def number(value: Any, file: str, key: str, *, lo: float | None = None, lo_open: bool = False,
           hi: float | None = None, hi_open: bool = False, what: str | None = None) -> float:
    """A finite number (not a boolean) within the bounds; ``what`` overrides how the range reads in errors."""
    if what is None:
        if lo is None and hi is None:
            what = "a number"
        elif hi is None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            low = "-inf" if lo is None else f"{lo:g}"
            what = f"a number in {'(' if lo_open or lo is None else '['}{low}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                # PyYAML follows YAML 1.1, where 1e3 (no dot) is a string; say so instead of a bare "got '1e3'".
                hint = "; write it unquoted, with a dot for exponents (1.0e3, not 1e3)"
            except ValueError:
                pass
        fail(file, key, f"expected {what}, got {describe(value)}{hint}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if not math.isfinite(value) or bad_lo or bad_hi:
        fail(file, key, f"expected {what}, got {value!r}")
    return float(value)


def integer(value: Any, file: str, key: str, lo: int = 0) -> int:
    """An integer (not a boolean) ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        fail(file, key, f"expected an integer >= {lo}, got {describe(value)}")
    return value


def index(value: Any, file: str, key: str, what: str) -> int:
    """A layer or expert index: a non-negative integer (a string of digits is accepted, e.g. JSON keys)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(file, key, f"expected {what} (a non-negative integer), got {describe(value)}")
    return value


def non_empty_list(value: Any, file: str, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        fail(file, key, f"expected a non-empty list, got {describe(value)}")
    return value


def one_of(value: Any, file: str, key: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        fail(file, key, f"expected one of {', '.join(choices)}, got {describe(value)}")
    return value
