"""``moe-worker``: the expert worker daemon's command line.

Two ways to say what to serve::

    moe-worker --topology sites.yaml --site pi-north [--listen 0.0.0.0:50051]
    moe-worker --listen 127.0.0.1:50051 --model moe.safetensors --experts 8:0-3,8:7,5:1   # or --experts all

Security: with --topology the site's ``tls`` (mutual TLS) and ``token_file`` (bearer token) keys apply;
``--tls-ca/--tls-cert/--tls-key`` (all three) and ``--token-file`` set them in --listen mode or override the site's.
With TLS the worker listens with TLS only and requires a client certificate signed by the CA; with a token every
call but health checks must carry it (docs/topology.md, "Security").

Mistakes a user can fix (missing model file, bad ``--experts``, unknown site, an expert the model lacks, a
``--listen`` without a port or with one out of range, a port in use) print one line on stderr and exit 2, before the
model loads; an unwritable ONNX cache exits 1 (one line too).
SIGTERM/SIGINT stop the worker gracefully and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moevit.cli.runner import exit_now, run_cli

if TYPE_CHECKING:
    from moevit.deploy.topology import TLSFiles

__all__ = ["CliError", "main", "parse_experts"]

PROG = "moe-worker"
log = logging.getLogger(PROG)

_ITEM = re.compile(r"(\d+):(\d+)(?:-(\d+))?\Z")


class CliError(Exception):
    """A usage mistake: printed as one line, exit code 2."""


def parse_experts(spec: str) -> dict[int, list[int]] | None:
    """``'8:0-3,8:7,5:1'`` -> ``{5: [1], 8: [0, 1, 2, 3, 7]}``; ``'all'`` -> None (every expert of every layer)."""
    spec = spec.strip()
    if spec == "all":
        return None
    hosted: dict[int, set[int]] = {}
    items = [s.strip() for s in spec.split(",")]
    if not spec or any(not s for s in items):
        raise CliError(f"bad --experts {spec!r}: expected 'all' or comma-separated LAYER:EXPERT or "
                       "LAYER:FIRST-LAST items, e.g. 8:0-3,8:7,5:1")
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise CliError(f"bad --experts item {item!r}: expected LAYER:EXPERT or LAYER:FIRST-LAST, e.g. 8:0-3")
        layer, first = int(m[1]), int(m[2])
        last = int(m[3]) if m[3] is not None else first
        if last < first:
            raise CliError(f"bad --experts item {item!r}: the range {first}-{last} is empty (write FIRST-LAST)")
        hosted.setdefault(layer, set()).update(range(first, last + 1))
    return {layer: sorted(experts) for layer, experts in sorted(hosted.items())}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve experts of a per-patch MoE MobileViTV2 over gRPC (moevit.rpc.v1.ExpertService).",
        epilog="Either --topology FILE --site NAME, or --listen ADDR --model FILE --experts SPEC.")
    where = p.add_argument_group("what to serve")
    where.add_argument("--topology", metavar="FILE", help="sites.yaml: hosted experts from its placement (or the "
                       "default placement), address and model from the file")
    where.add_argument("--site", metavar="NAME", help="the site to serve (with --topology); otherwise only a label "
                       "reported by Info (default: this host's name)")
    where.add_argument("--listen", metavar="ADDR", help="host:port to listen on (port 0 picks a free port); with "
                       "--topology it overrides the site's address")
    where.add_argument("--model", metavar="FILE", help="moevit checkpoint (.safetensors); with --topology it "
                       "overrides the file's model")
    where.add_argument("--experts", metavar="SPEC", help="experts to host: LAYER:EXPERT or LAYER:FIRST-LAST items, "
                       "comma-separated (e.g. 8:0-3,8:7,5:1), or 'all'")
    run = p.add_argument_group("how to serve")
    run.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="compute backend (default torch)")
    run.add_argument("--onnx-cache", metavar="DIR",
                     help="folder for exported ONNX graphs (default: <model>.onnx-cache/ beside the model)")
    run.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="with --backend onnx: float32 "
                     "expert graphs, or int8 (int8 weights; each call's tokens quantised on the fly, or with "
                     "--calibrate statically; docs/onnx.md)")
    run.add_argument("--calibrate", metavar="SPEC", help="with --precision int8: static quantisation instead, "
                     "calibrated on this dataset spec's train split (each expert on the tokens it receives when the "
                     "model classifies those images in-process); slower and less close to float than the default")
    run.add_argument("--calibrate-images", type=int, default=64, metavar="N",
                     help="images of --calibrate used (default 64)")
    run.add_argument("--threads", type=int, metavar="N", help="torch / onnxruntime intra-op threads (default 1: "
                     "safe beside a coordinator and other workers on the same cores; an expert call is small. Raise "
                     "it only on a device the worker has to itself)")
    run.add_argument("--max-message-mb", type=float, default=64.0, metavar="MB",
                     help="largest gRPC message received or sent, MiB (default 64)")
    run.add_argument("--max-tokens", type=int, metavar="N", help="largest token count per request "
                     "(default 262144)")
    run.add_argument("--max-queue", type=int, default=32, metavar="N",
                     help="expert calls admitted at once (computing or queued); more get RESOURCE_EXHAUSTED at "
                     "once so the coordinator tries another replica (default 32)")
    run.add_argument("--grace", type=float, default=5.0, metavar="S",
                     help="seconds calls in flight get to finish on SIGTERM/SIGINT (default 5)")
    run.add_argument("--metrics-port", metavar="[HOST:]PORT", help="serve Prometheus metrics at "
                     "http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sec = p.add_argument_group("security (default with --topology: the site's tls and token_file)")
    sec.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) that client certificates must be "
                     "signed by; with --tls-cert and --tls-key: listen with mutual TLS only")
    sec.add_argument("--tls-cert", metavar="FILE", help="this worker's certificate (PEM)")
    sec.add_argument("--tls-key", metavar="FILE", help="this worker's private key (PEM, unencrypted)")
    sec.add_argument("--token-file", metavar="FILE", help="file holding the bearer token every call but health "
                     "checks must carry")
    return p


@dataclass(frozen=True)
class _Plan:
    """What to serve and how, resolved from the flags (and the topology)."""

    model: Path
    hosted: dict[int, list[int]] | None  # None: every expert of every MoE layer
    address: str
    site: str
    placement_fingerprint: str | None = None
    tls: TLSFiles | None = None  # the site's, before the --tls-* flags apply
    token_file: Path | None = None


def _resolve(args: argparse.Namespace) -> _Plan:
    if args.topology is not None:
        return _resolve_topology(args)
    missing = [flag for flag, value in (("--listen", args.listen), ("--model", args.model),
                                        ("--experts", args.experts)) if value is None]
    if missing:
        raise CliError(f"missing {', '.join(missing)}: give --listen ADDR --model FILE --experts SPEC, "
                       "or --topology FILE --site NAME")
    hosted = parse_experts(args.experts)
    model = _existing_model(args.model)
    return _Plan(model, hosted, args.listen, args.site or socket.gethostname())


def _existing_model(path: str | Path) -> Path:
    model = Path(path)
    if not model.is_file():
        raise CliError(f"{model}: no such model file")
    return model


def _resolve_topology(args: argparse.Namespace) -> _Plan:
    from moevit.deploy.topology import TopologyError, load_topology

    if args.site is None:
        raise CliError("--topology needs --site NAME: the site this worker serves")
    if args.experts is not None:
        raise CliError("--experts cannot be combined with --topology: the topology's placement says what to host")
    try:
        topology = load_topology(args.topology)
    except FileNotFoundError:
        raise CliError(f"{args.topology}: no such topology file") from None
    except (TopologyError, OSError) as e:
        raise CliError(str(e)) from None
    try:
        site = topology.site(args.site)
    except KeyError as e:
        raise CliError(f"{args.topology}: {e.args[0]}") from None
    if args.model is not None:
        model = _existing_model(args.model)
    elif topology.model is None:
        raise CliError(f"{args.topology}: no 'model' key; give the checkpoint with --model FILE")
    else:
        model = _existing_model(topology.model)
    from moevit.checkpoint import CheckpointError, read_config  # torch: only once the cheap checks passed

    try:
        config = read_config(model)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    if config is None or config.moe is None:
        raise CliError(f"{model}: not a moevit MoE checkpoint (no MoE layers in its config)")
    layout = {layer: config.moe.num_experts for layer in config.moe.layers}
    try:
        placement = topology.resolve_placement(layout)
    except (TopologyError, ValueError) as e:
        raise CliError(str(e)) from None
    hosted = placement.experts_on(site.name)
    if not hosted:
        raise CliError(f"{args.topology}: site {site.name!r} hosts no experts in the "
                       f"{'default ' if topology.placement is None else ''}placement; nothing to serve")
    return _Plan(model, hosted, args.listen or site.address, site.name, placement.fingerprint, site.tls,
                 site.token_file)


_TLS_FLAGS = (("--tls-ca", "tls_ca"), ("--tls-cert", "tls_cert"), ("--tls-key", "tls_key"))


def _security(args: argparse.Namespace, plan: _Plan) -> tuple[TLSFiles | None, str | None]:
    """The TLS files and the bearer token to serve with: the flags' when given, else the site's; all checked."""
    from moevit.deploy.topology import TLSFiles

    given = [flag for flag, attr in _TLS_FLAGS if getattr(args, attr) is not None]
    if given and len(given) < len(_TLS_FLAGS):
        missing = [flag for flag, attr in _TLS_FLAGS if getattr(args, attr) is None]
        raise CliError(f"{', '.join(given)} without {', '.join(missing)}: mutual TLS needs all three of "
                       "--tls-ca, --tls-cert and --tls-key")
    tls = TLSFiles(Path(args.tls_ca), Path(args.tls_cert), Path(args.tls_key)) if given else plan.tls
    if tls is not None:
        from moevit_rpc.channels import check_tls_files

        try:
            check_tls_files(tls)
        except ValueError as e:
            raise CliError(str(e)) from None
    token_file = Path(args.token_file) if args.token_file is not None else plan.token_file
    return tls, None if token_file is None else _read_token(token_file)


def _read_token(path: Path) -> str:
    from moevit_rpc.channels import read_token  # the one rule, as the coordinator's

    try:
        return read_token(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def _serve(args: argparse.Namespace) -> int:
    plan = _resolve(args)
    model, hosted, address, site = plan.model, plan.hosted, plan.address, plan.site
    from moevit_rpc.listen import check_free

    try:  # before the model loads: grpc would bind port 70000 as 4464 and a bare host as :443
        check_free(address, "--listen" if args.listen is not None else f"site {site}'s address")
    except ValueError as e:
        raise CliError(str(e)) from None
    tls, token = _security(args, plan)
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.precision == "int8" and args.backend != "onnx":
        raise CliError("--precision int8 needs --backend onnx")
    if args.calibrate and args.precision != "int8":
        raise CliError("--calibrate needs --backend onnx --precision int8")
    if args.calibrate_images < 1:
        raise CliError(f"--calibrate-images must be >= 1, got {args.calibrate_images}")
    if not args.max_message_mb > 0:
        raise CliError(f"--max-message-mb must be positive, got {args.max_message_mb}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_queue < 1:
        raise CliError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not args.grace >= 0:
        raise CliError(f"--grace must be >= 0 seconds, got {args.grace}")
    if args.metrics_port is not None:
        from moevit_rpc.metrics import parse_listen

        try:
            parse_listen(args.metrics_port)
        except ValueError as e:
            raise CliError(str(e)) from None

    # Heavy imports only once the arguments are known to be sound: a typo fails in a fraction of a second.
    import asyncio

    import torch
    from moevit.worker.backends import ExpertBackend, OnnxBackend, TorchBackend
    from moevit.worker.server import WorkerConfigError, load_hosted, serve
    from moevit.worker.service import DEFAULT_MAX_TOKENS

    from moevit.checkpoint import CheckpointError

    torch.set_num_threads(args.threads or 1)
    try:
        banks, fingerprint, config = load_hosted(model, hosted)
    except (CheckpointError, WorkerConfigError) as e:
        raise CliError(str(e)) from None
    if plan.placement_fingerprint is not None and plan.placement_fingerprint != fingerprint:
        log.warning("the placement was made for model %s but %s is model %s", plan.placement_fingerprint, model,
                    fingerprint)
    backend: ExpertBackend
    if args.backend == "onnx":
        cache = Path(args.onnx_cache) if args.onnx_cache else model.with_name(model.name + ".onnx-cache")
        calibration, key = _expert_calibration(args, model) if args.calibrate else (None, "")
        backend = OnnxBackend(banks, fingerprint, cache, threads=args.threads or 1, precision=args.precision,
                              calibration=calibration, calibration_key=key)
        log.info("onnx graphs in %s: %d exported, %d reused", cache, len(backend.exported), len(backend.reused))
    else:
        backend = TorchBackend(banks)
    arch = f"{config.arch}_moe" if config.moe is not None else config.arch
    credentials = None
    if tls is not None:
        from moevit_rpc.security import server_credentials

        credentials = server_credentials(tls.ca, tls.cert, tls.key)
    asyncio.run(serve(backend, fingerprint, arch=arch, address=address, site=site,
                      max_message_bytes=int(args.max_message_mb * (1 << 20)),
                      max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS, grace=args.grace,
                      metrics=args.metrics_port, credentials=credentials, token=token, max_queue=args.max_queue))
    return 0


def _expert_calibration(args: argparse.Namespace, model: Path) -> tuple[dict[tuple[int, int], Any], str]:
    """Each expert's tokens on ``--calibrate``'s images (the whole model run in-process), and their cache key."""
    from moevit.checkpoint import load_checkpoint
    from moevit.fuse import folded_copy
    from moevit.onnx_camera import calibration_images, calibration_key, expert_tokens

    full = folded_copy(load_checkpoint(model))
    try:
        images = calibration_images(args.calibrate, full.config.image_size, args.calibrate_images)
    except (ValueError, OSError) as e:
        raise CliError(f"--calibrate {args.calibrate}: {e}") from None
    return expert_tokens(full, images), calibration_key(args.calibrate, args.calibrate_images)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``moe-worker``; returns the exit status."""
    args = _parser().parse_args(argv)
    # before any other thread allocates: what they free stays returnable (moevit_rpc.memory)
    from moevit_rpc.memory import one_arena

    one_arena()
    # Idle OpenMP threads sleep instead of spinning, so they do not take cores from the processes beside this one.
    # Read by the OpenMP runtime when torch loads (later, in _serve): a setting of the user's own wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # --log-level applies to the worker's own loggers; libraries (grpc's asyncio engine is chatty) stay at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s moe-worker %(levelname)s %(name)s: %(message)s")
    for name in ("moevit.worker", "moevit_rpc", PROG):  # moevit_rpc: refusals of requests that do not parse
        logging.getLogger(name).setLevel(args.log_level.upper())
    # OSError (an unwritable ONNX cache): not a usage mistake (exit 1), but still one clear line. KeyboardInterrupt:
    # Ctrl-C while loading, before the graceful handlers are installed
    return run_cli(PROG, lambda: _serve(args), errors=(CliError,), failures=(OSError,))


if __name__ == "__main__":
    # how the coordinator's launcher, the emulation and the tests start workers: the process ends as soon as the
    # server has stopped, without the interpreter's teardown (exit_now)
    exit_now(main())
