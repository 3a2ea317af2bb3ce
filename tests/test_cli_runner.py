"""One CLI shape: every console script reports errors through :func:`moevit.cli.runner.run_cli`, and argparse is
imported only by entry points."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from moevit.cli.runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
# the package folders installed under moevit's namespace (pyproject's package-dir)
HOMES = {"moevit.coordinator": "coordinator", "moevit.worker": "worker", "moevit.partition": "partition",
         "moevit.sim": "sim"}


def _source_of(module: str) -> Path:
    for prefix, folder in HOMES.items():
        if module == prefix or module.startswith(prefix + "."):
            return ROOT / folder / Path(*module[len(prefix) + 1:].split(".")).with_suffix(".py")
    return ROOT / Path(*module.split(".")).with_suffix(".py")


def _scripts() -> dict[str, tuple[Path, str]]:
    import tomllib  # Python 3.11+, as test_layout

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out = {}
    for name, target in doc["project"]["scripts"].items():
        module, func = target.split(":")
        out[name] = (_source_of(module), func)
    return out


def test_user_errors_are_one_line_and_exit_2(capsys):
    def bad() -> int:
        raise ValueError("--limit must be >= 1, got 0")

    assert run_cli("moe-x", bad) == 2
    assert capsys.readouterr().err == "moe-x: error: --limit must be >= 1, got 0\n"

    def missing() -> int:
        raise KeyError("no site 'north' in sites.yaml")

    assert run_cli("moe-x", missing) == 2
    assert capsys.readouterr().err == "moe-x: error: no site 'north' in sites.yaml\n"  # not KeyError's quotes


def test_failures_exit_1_interrupts_130_and_bugs_keep_their_traceback(capsys):
    def died() -> int:
        raise RuntimeError("worker north exited:\n  address already in use")

    assert run_cli("moe-x", died, failures=(RuntimeError,), one_line=True) == 1
    assert capsys.readouterr().err == "moe-x: error: worker north exited: address already in use\n"

    def ctrl_c() -> int:
        raise KeyboardInterrupt

    assert run_cli("moe-x", ctrl_c, interrupted=lambda: "; run it again to resume") == 130
    assert capsys.readouterr().err == "moe-x: interrupted; run it again to resume\n"

    def bug() -> int:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        run_cli("moe-x", bug)
    assert run_cli("moe-x", lambda: None) == 0 and run_cli("moe-x", lambda: 3) == 3


def test_every_console_script_reports_through_run_cli():
    scripts = _scripts()
    assert len(scripts) >= 12
    for name, (path, func) in scripts.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        [entry] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
        called = {n.func.id for n in ast.walk(entry) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "run_cli" in called, f"{name} ({path.relative_to(ROOT)}:{func}) does not report through run_cli"


def test_argparse_only_in_entry_points():
    entry = {path for path, _ in _scripts().values()}
    offenders = []
    for folder in ("moevit", *HOMES.values(), "moevit_rpc"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            imports = {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
            imports |= {n.module for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.module}
            # an entry point: a console script's module, or one run as ``python -m`` (a __main__ guard)
            if "argparse" in imports and path not in entry and 'if __name__ == "__main__"' not in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"argparse outside the CLI modules: {offenders}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
