"""Packaging rules: no top-level module of ours shadows a dependency's; the network imports no grpc or ray."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ["moevit", "moevit_rpc"]  # the only top-level names we install
NESTED = ["coordinator", "worker", "partition", "sim", "deploy"]  # top-level folders installed as moevit.<name>


def test_no_top_level_name_shadows_a_dependency():
    owners = md.packages_distributions()
    clashes = {name: owners[name] for name in OURS if set(owners.get(name, [])) - {"moevit"}}
    assert not clashes, f"top-level names also installed by other distributions: {clashes}"
    # proto/ holds .proto sources only: proto-plus owns the importable `proto`
    assert not (ROOT / "proto" / "__init__.py").exists()


def test_declared_packages_are_the_layout():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {f"moevit.{n}": n for n in NESTED}
    on_disk = set()
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT).parts
        if rel[0] in NESTED:
            rel = ("moevit", *rel)
        if rel[0] in ("moevit", "moevit_rpc"):
            on_disk.add(".".join(rel))
    assert set(setup["packages"]) == on_disk, "pyproject's package list and the folders with __init__.py differ"


def test_no_generic_top_level_package_is_importable_outside_the_checkout(tmp_path):
    code = ("import importlib.util, sys; names = " + repr(NESTED) + ";"
            "found = [n for n in names if importlib.util.find_spec(n)]; print(found); sys.exit(bool(found))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", "import moevit.coordinator.cli, moevit.worker.cli, moevit.sim.cli"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_network_package_imports_no_grpc_or_ray():
    code = ("import sys, moevit, moevit.checkpoint, moevit.moefy, moevit.flops;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('grpc','ray')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ import layering

FOLDERS = {"moevit": "moevit", "moevit_rpc": "moevit_rpc", "bench": "bench", "tests": "tests",
           **{n: f"moevit.{n}" for n in NESTED}}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of ours (generated protobuf code left out)."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            if "v1" in rel:
                continue
            out[".".join((package, *rel))] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at top level or inside functions (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli") or _under(module, "moevit.cli") or module in _console_scripts()


NETWORK_MAY_NOT = ("grpc", "ray", "moevit.coordinator", "moevit.worker", "moevit.partition", "moevit.sim")


@functools.cache
def _console_scripts() -> frozenset[str]:
    """Modules that are console scripts (pyproject's [project.scripts]): command-line modules whatever their name."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return frozenset(target.split(":")[0] for target in scripts.values())


def _layering_violations() -> list[str]:
    modules = _modules()
    bad = []
    for name, path in sorted(modules.items()):
        rel = path.relative_to(ROOT)
        imports = _imports(name, path)
        for imp in sorted(imports):
            if imp.rpartition(".")[0] in imports and not _is_cli(imp):
                continue  # `from pkg.mod import name`: pkg.mod is judged already
            if _under(name, "moevit.worker") and _under(imp, "moevit.coordinator"):
                bad.append(f"{rel}: the worker imports the coordinator ({imp})")
            in_network = _under(name, "moevit") and not _under(name, *(f"moevit.{n}" for n in NESTED))
            if in_network and _under(imp, *NETWORK_MAY_NOT):
                bad.append(f"{rel}: the network package imports {imp}")
            if _under(name, "moevit.deploy") and _under(imp, "torch", "grpc", "ray"):
                bad.append(f"{rel}: the deploy layer imports {imp}")
            if (not _is_cli(name) and not _under(name, "tests", "bench") and _is_cli(imp)
                    and (imp in modules or imp.rpartition(".")[0] in modules)):
                bad.append(f"{rel}: a library module imports the command-line module {imp}")
            if _under(name, "bench") and _under(imp, "tests"):
                bad.append(f"{rel}: a benchmark imports the tests ({imp}); use moevit.coordinator.local")
            if _under(name, "tests") and _under(imp, "bench"):
                bad.append(f"{rel}: a test imports a benchmark script ({imp}); move what it needs into the library")
    return bad


def test_import_layering():
    """worker never imports coordinator; the network (moevit/) imports no grpc, ray, coordinator, worker, partition
    or sim; the deploy layer imports no torch, grpc or ray; only command-line modules import command-line modules;
    bench/ never imports tests/ and tests/ never imports bench/ (both use the harness, moevit.coordinator.local)."""
    assert _layering_violations() == []


def test_deploy_layer_loads_no_torch_grpc_or_ray():
    code = ("import sys, moevit.deploy, moevit.deploy.config, moevit.deploy.files, moevit.deploy.topology;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','grpc','ray')];"
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_layering_check_catches_a_violation(tmp_path, monkeypatch):
    """The scan is real: a worker module importing the coordinator is reported."""
    fake = tmp_path / "worker" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from moevit.coordinator.runtime import SplitRuntime\n")
    assert _imports("moevit.worker.bad", fake) >= {"moevit.coordinator.runtime"}
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: {"moevit.worker.bad": fake})
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _layering_violations()
    assert found and all(v.startswith("worker/bad.py: the worker imports the coordinator (moevit.coordinator.runtime")
                         for v in found), found


def test_every_benchmark_result_is_indexed():
    """bench/results/INDEX.md names every result file (what produced it, whether it is current)."""
    index = (ROOT / "bench" / "results" / "INDEX.md").read_text(encoding="utf-8")
    results = ROOT / "bench" / "results"
    files = [p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file() and p.name != "INDEX.md"]
    missing = [f for f in files if f"`{f}`" not in index and f"`{Path(f).name}`" not in index]
    assert not missing, f"bench/results/INDEX.md does not list: {missing}"
