"""Packaging rules: no top-level module of ours shadows a dependency's; the network imports no grpc or ray."""

from __future__ import annotations

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
