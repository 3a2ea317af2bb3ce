"""Packaging rules: no top-level module of ours shadows a dependency's; the network imports no grpc or ray."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ["moevit", "moevit_rpc", "coordinator", "worker", "partition", "sim"]


def test_no_top_level_name_shadows_a_dependency():
    owners = md.packages_distributions()
    clashes = {name: owners[name] for name in OURS if set(owners.get(name, [])) - {"moevit"}}
    assert not clashes, f"top-level names also installed by other distributions: {clashes}"
    # proto/ holds .proto sources only: proto-plus owns the importable `proto`
    assert not (ROOT / "proto" / "__init__.py").exists()


def test_declared_packages_are_the_layout():
    text = (ROOT / "pyproject.toml").read_text()
    for name in OURS:
        assert f'"{name}*"' in text


def test_network_package_imports_no_grpc_or_ray():
    code = ("import sys, moevit, moevit.checkpoint, moevit.moefy, moevit.flops;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('grpc','ray')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
