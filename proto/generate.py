#!/usr/bin/env python3
"""Regenerate the Python gRPC/protobuf code of the moevit expert service, or check that it is fresh.

The one command (run from anywhere; it works from the repository root)::

    .venv/bin/python proto/generate.py           # write moevit_rpc/v1/expert_pb2{.py,.pyi,_grpc.py}
    .venv/bin/python proto/generate.py --check   # regenerate into a temp dir, compare byte for byte

It runs ``grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/moevit_rpc/v1/expert.proto``
with the pinned grpcio-tools, so the generated files land in the top-level package ``moevit_rpc``.

Exit status: 0 ok; 1 ``--check`` found a stale or missing generated file; 2 the tooling is wrong (grpcio-tools
missing or not the pinned version, protoc failed).

Note: this folder (proto/) is deliberately not a Python package: proto-plus installs a top-level module ``proto``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Pinned code generator: keep equal to the grpcio-tools pin of the dev extra in pyproject.toml.
GRPCIO_TOOLS_PIN = "1.85.1"

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
# .proto sources, relative to PROTO_DIR (which is the -I include root, so this is also the import path).
PROTO_FILES = ("moevit_rpc/v1/expert.proto",)


def generated_files(proto: str) -> list[str]:
    """Paths, relative to the output root, that protoc writes for one .proto source."""
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def check_tool_version() -> str | None:
    """Return an error message when grpcio-tools is missing or is not the pinned version, else None."""
    try:
        installed = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return (
            f"grpcio-tools is not installed in {sys.executable}; install the pinned generator: "
            f"pip install 'grpcio-tools=={GRPCIO_TOOLS_PIN}' (or pip install -e '.[dev]')"
        )
    if installed != GRPCIO_TOOLS_PIN:
        return (
            f"grpcio-tools {installed} is installed but the generated code is pinned to grpcio-tools "
            f"{GRPCIO_TOOLS_PIN}; another version writes different code (and different version guards). "
            f"Install the pin: pip install 'grpcio-tools=={GRPCIO_TOOLS_PIN}'"
        )
    return None


def run_protoc(out_dir: Path) -> None:
    """Generate the Python code of every PROTO_FILES entry under out_dir (which must exist)."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"proto/{p}" for p in PROTO_FILES),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def generate() -> int:
    run_protoc(REPO_ROOT)
    for proto in PROTO_FILES:
        for rel in generated_files(proto):
            print(f"wrote {rel}")
    return 0


def check() -> int:
    """Regenerate into a temporary directory and compare byte for byte with the committed files."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="moevit-protoc-") as tmp:
        tmp_dir = Path(tmp)
        run_protoc(tmp_dir)
        for proto in PROTO_FILES:
            for rel in generated_files(proto):
                fresh = (tmp_dir / rel).read_bytes()
                committed_path = REPO_ROOT / rel
                if not committed_path.is_file():
                    problems.append(f"missing generated file {rel}")
                elif committed_path.read_bytes() != fresh:
                    problems.append(f"stale generated file {rel} (differs from what proto/{proto} generates)")
    if problems:
        for p in problems:
            print(f"ERROR: {p}", file=sys.stderr)
        print("Regenerate with: .venv/bin/python proto/generate.py", file=sys.stderr)
        return 1
    print(f"generated code is up to date (grpcio-tools {GRPCIO_TOOLS_PIN})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; regenerate into a temp dir and exit 1 if a committed generated file differs",
    )
    args = parser.parse_args(argv)
    err = check_tool_version()
    if err is not None:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    try:
        return check() if args.check else generate()
    except RuntimeError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
