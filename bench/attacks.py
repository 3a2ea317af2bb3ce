"""Attacks of issue 21 against real processes on loopback, with the figure each one is judged by.

    .venv/bin/python bench/attacks.py worker-refused     # item 1: worker RSS and health latency under refused requests
    .venv/bin/python bench/attacks.py worker-refused-cpu --rounds 10  # item 1: worker CPU per refused request
    .venv/bin/python bench/attacks.py health-watches     # item 3: idle Health.Watch streams vs RunExperts
    .venv/bin/python bench/attacks.py classify-bomb      # item 2: a legitimate Classify behind a progressive-JPEG bomb
    .venv/bin/python bench/attacks.py classify-flood     # item 6: Classify server RSS under 48 MiB junk requests
    .venv/bin/python bench/attacks.py worker-admitted    # the worker's memory per admitted 32 MiB request

Each prints one JSON object (and with ``--out FILE`` writes it through ``bench/common.py``'s ``write_result``).
The payload builders and the measurements live in ``sim/attacks.py`` (``moevit.sim.attacks``), shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
from moevit.sim.attacks import (  # noqa: E402
    CHANNEL_OPTIONS,
    ClassifyDeployment,
    attack_bomb,
    attack_flood,
    attack_refused,
    attack_refused_cpu,
    attack_watches,
    in_background,
    rss_mb,
    small_model,
    start_worker,
    stop,
)

from moevit_rpc.v1 import expert_pb2  # noqa: E402


def worker_refused(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model, fingerprint = small_model(Path(tmp))
        from moevit.checkpoint import read_config

        cfg = read_config(model)
        dim = _layer_dim(model, 8)
        proc, address = start_worker(model, "8:0-2")
        try:
            time.sleep(1.0)
            load = [round(x, 2) for x in os.getloadavg()]
            result = attack_refused(address, proc.pid, fingerprint, layer=8, dim=dim, unhosted=3, rounds=args.rounds,
                                    stream=args.stream)
        finally:
            stop(proc)
        # health latency is bound by the load: with a 2-core machine at load 12-21 the worker waits its turn
        result["loadavg_start"], result["loadavg_end"] = load, [round(x, 2) for x in os.getloadavg()]
        result["model"] = {"arch": cfg.arch, "layer": 8, "dim": dim}
        return result


def worker_refused_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """The worker's CPU per refused request, by kind: refused from the message (no headers: an older client or
    one that does not say what it sends), from the call's headers (moevit_rpc.headers: the message is never
    received) and, on a worker with a token, for a caller without it. Process CPU time, fair under load."""
    with tempfile.TemporaryDirectory() as tmp:
        model, fingerprint = small_model(Path(tmp))
        (Path(tmp) / "token").write_text("s3cret-token\n")
        out: dict[str, Any] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()]}
        for label, extra in (("no_token", ()), ("token", ("--token-file", str(Path(tmp) / "token")))):
            proc, address = start_worker(model, "8:0-2", *extra)
            try:
                time.sleep(1.0)
                out[label] = attack_refused_cpu(address, proc.pid, fingerprint, layer=8, dim=_layer_dim(model, 8),
                                                unhosted=3, repeat=args.rounds,
                                                token="s3cret-token" if extra else None)
            finally:
                stop(proc)
        out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return out


def _layer_dim(model: Path, layer: int) -> int:
    from moevit.checkpoint import load_checkpoint

    return int(load_checkpoint(model).moe_layers()[layer].experts.dim)


def worker_admitted(args: argparse.Namespace) -> dict[str, Any]:
    """Memory of admitted requests: one valid 32 MiB request (65,536 tokens of dim 128, fp32), then 4 at once,
    with the worker's RSS sampled every 10 ms; the peak growth over the idle RSS, per request."""
    import torch

    from moevit_rpc.tensors import tensor_to_proto

    with tempfile.TemporaryDirectory() as tmp:
        model, fingerprint = small_model(Path(tmp))
        proc, address = start_worker(model, "8:0-2")
        out: dict[str, Any] = {}
        try:
            x = torch.randn(65536, 128)
            req = expert_pb2.RunExpertsRequest(model_fingerprint=fingerprint, layer=8, packed=expert_pb2.PackedTokens(
                experts=[0, 1], counts=[32768, 32768], tokens=tensor_to_proto(x, "fp32"))).SerializeToString()
            out["request_mib"] = round(len(req) / (1 << 20), 2)
            with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
                unary = ch.unary_unary("/moevit.rpc.v1.ExpertService/RunExperts")
                unary(req, timeout=120)  # warm-up: the allocator's arenas reach their working size
                time.sleep(1.0)
                for n in (1, 4):
                    idle = rss_mb(proc.pid)
                    peak = [idle]
                    done = threading.Event()

                    def sample(done: threading.Event = done, peak: list[float] = peak) -> None:
                        while not done.is_set():
                            peak.append(rss_mb(proc.pid))
                            done.wait(0.01)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    calls = [in_background(lambda: unary(req, timeout=120)) for _ in range(n)]
                    for t, _ in calls:
                        t.join(130)
                    done.set()
                    sampler.join()
                    out[f"{n}_at_once"] = {"idle_mb": round(idle, 1), "peak_mb": round(max(peak), 1),
                                           "peak_growth_per_request_mb": round((max(peak) - idle) / n, 1)}
                    time.sleep(1.0)
        finally:
            stop(proc)
        return out


def health_watches(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = small_model(Path(tmp))
        (Path(tmp) / "token").write_text("s3cret-token\n")
        out = {}
        for label, extra in (("no_token", ()), ("token", ("--token-file", str(Path(tmp) / "token")))):
            proc, address = start_worker(model, "8:0-2", *extra)
            try:
                out[label] = attack_watches(address, token="s3cret-token" if extra else None)
            finally:
                stop(proc)
        return out


def classify_bomb(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, ClassifyDeployment(Path(tmp)) as dep:
        return attack_bomb(dep.address, dep.proc.pid)


def classify_flood(args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` floods one after another on one server: whether its RSS keeps growing or levels off."""
    with tempfile.TemporaryDirectory() as tmp, ClassifyDeployment(Path(tmp)) as dep:
        time.sleep(1.0)
        rounds = []
        for _ in range(args.rounds):
            rounds.append(attack_flood(dep.address, dep.proc.pid))
            time.sleep(2.0)
        return {**rounds[0], "rounds": rounds, "rss_after_last_mb": rounds[-1]["rss_end_mb"],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("attack", choices=sorted(ATTACKS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--stream", action="store_true", help="worker-refused: also send the requests on a stream")
    ap.add_argument("--out", help="write the JSON result here (bench/results/...)")
    args = ap.parse_args(argv)
    result = ATTACKS[args.attack](args)
    print(json.dumps(result, indent=1))
    if args.out:
        from bench.common import write_result

        write_result(args.out, {"attack": args.attack, **result})
    return 0


ATTACKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "worker-refused": worker_refused, "classify-bomb": classify_bomb, "classify-flood": classify_flood,
    "health-watches": health_watches, "worker-admitted": worker_admitted, "worker-refused-cpu": worker_refused_cpu}

if __name__ == "__main__":
    raise SystemExit(main())
