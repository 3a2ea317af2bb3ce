"""``moe-certs --topology sites.yaml --out DIR``: a CA and a certificate per site of a topology (mutual TLS for
coordinator and workers), optionally a bearer token per site; prints the entries to add to sites.yaml.

For tests and small deployments; a real deployment may use its own PKI with the same sites.yaml keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from moevit.deploy.topology import TopologyError, load_topology

from moevit.cli.runner import run_cli
from moevit_rpc.security import write_site_pki


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-certs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", required=True)
    ap.add_argument("--out", required=True, help="folder for ca.pem, <site>.pem, <site>.key (keys mode 0600)")
    ap.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    ap.add_argument("--tokens", action="store_true", help="also write a random bearer token per site")
    ap.add_argument("--replace-ca", action="store_true", help="replace a CA already in --out (every certificate "
                    "issued with it stops being accepted)")
    args = ap.parse_args(argv)
    return run_cli("moe-certs", lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    try:
        topo = load_topology(args.topology, require_coordinator_links=False)
    except TopologyError as e:
        print(f"moe-certs: error: {e}", file=sys.stderr)
        return 2
    if args.days < 1:
        print("moe-certs: error: --days must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out).absolute()
    existing = [p.name for p in (out / "ca.pem", out / "ca.key") if p.exists() or p.is_symlink()]
    if existing and not args.replace_ca:  # a new CA would orphan every certificate a deployed fleet holds
        print(f"moe-certs: error: {out} already holds a CA ({', '.join(existing)}); replacing it would invalidate "
              "every certificate issued with it. Choose another --out, or pass --replace-ca to start over",
              file=sys.stderr)
        return 2
    try:
        entries = write_site_pki(out, {n: s.host for n, s in topo.sites.items()}, days=args.days,
                                 tokens=args.tokens)
    except OSError as e:
        print(f"moe-certs: error: --out {args.out}: cannot write there: {e.strerror or e}"
              + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 2
    print(f"# wrote a CA and {len(entries)} site certificates to {out}; add under each site of {args.topology}:")
    print(yaml.safe_dump({"sites": entries}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
