"""``moe-export``: turn moevit results into archive formats.

    moe-export camtrapdp results.json --deployments deployments.yaml --out camtrap-dp/
    moe-export camtrapdp a.json b.json --deployments deployments.yaml --topology sites.yaml --out camtrap-dp/

``camtrapdp`` writes a Camtrap DP 1.0.2 package (datapackage.json, deployments.csv, media.csv, observations.csv)
from the MegaDetector results of ``moe-coordinator --out results.json`` and a deployments file
(examples/deployments.yaml). With ``--topology`` every ``site:`` of the deployments file must be a site of the
topology, and the topology's model must be the model that made the results. Mistakes print one line and exit 2.
See docs/outputs.md for the mapping.
"""

from __future__ import annotations

import argparse
import sys

from moevit.coordinator.fieldmeta import DEFAULT_SEQUENCE_GAP_S

from moevit.cli.runner import run_cli

PROG = "moe-export"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="format", required=True, metavar="FORMAT")
    c = sub.add_parser("camtrapdp", help="Camtrap DP 1.0.2 package (TDWG camera-trap data standard)",
                       description="Write a Camtrap DP 1.0.2 package from moevit MegaDetector results.")
    c.add_argument("results", nargs="+", metavar="RESULTS.json", help="results of moe-coordinator --out (one model)")
    c.add_argument("--deployments", required=True, metavar="FILE",
                   help="deployments YAML: project, contributors, and per deployment its place, time and files "
                        "(see examples/deployments.yaml)")
    c.add_argument("--topology", action="append", default=[], metavar="FILE",
                   help="sites.yaml: check the deployments' sites and the model (repeatable)")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for the package (created; files replaced)")
    c.add_argument("--sequence-gap", type=float, default=None, metavar="S",
                   help=f"seconds between images that start a new event (default: the gap of the run, else "
                        f"{DEFAULT_SEQUENCE_GAP_S:.0f})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    from moevit.coordinator.camtrapdp import ExportError, export_camtrapdp

    warn = lambda s: print(f"{PROG}: warning: {s}", file=sys.stderr)  # noqa: E731
    if args.sequence_gap is not None and not args.sequence_gap >= 0:
        raise ExportError(f"--sequence-gap must be >= 0 seconds, got {args.sequence_gap}")
    summary = export_camtrapdp(args.results, args.deployments, args.out, topologies=args.topology,
                               gap_s=args.sequence_gap, warn=warn)
    print(f"Camtrap DP 1.0.2 package in {summary['out']}: {summary['deployments']} deployment(s), "
          f"{summary['media']} media, {summary['observations']} observations ({summary['events']} events), model "
          f"{summary['model']}" + (f"; {summary['dropped']} image(s) without a capture time left out"
                                   if summary["dropped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
