"""Soak of issue 21: the attacks of ``bench/attacks.py`` mixed into normal Classify traffic on one deployment.

    .venv/bin/python bench/soak_attacks.py [--duration 180] [--seed 0] [--out bench/results/soak_attacks.json]

Deployment (``bench/attacks.py``'s ClassifyDeployment): a ``moe-worker`` process and a ``moe-coordinator --serve
--max-batch 1`` process in front of it, on loopback, the tests' small MoE model at 64 px.

Normal traffic: ``--clients`` closed-loop threads send seeded 64-px PNGs (``--images`` of them, in turn) with a
``--deadline`` each. Before any attack, every image is classified once: its answer is the reference, and every
later answer must match it (same top-1, every probability within 1e-4) or it counts as *wrong*.

Attacks, one at a time from ``random.Random(--seed)``, ``--gap`` seconds apart (uniform), each of:

* ``bomb``: a progressive JPEG over the scan limits (refused from its bytes); ``bomb_ok``: one within them
  (decoded on the decode threads);
* ``cancelled``: 4 Classify calls of a 6000x6000 PNG whose callers give up after 0.1 s;
* ``junk``: 4 concurrent Classify calls of 16 MiB of junk;
* ``refused``: refused RunExperts straight to the worker (wrong fingerprint, 32 MiB; 5 M packed entries;
  12 M empty batches in 57 MiB);
* ``watches``: 100 idle Health.Watch streams on the worker, held 2 s;
* ``stream_cancel``: a RunExpertsStream whose caller cancels while its 51 MB answer may be on the way.

Measured: per attack kind how often it ran and the status codes it got; normal requests sent, answered OK,
failed (by code), wrong, over their deadline, latency p50/p99/max; RSS of the worker and the coordinator every 0.5 s
with a linear slope (MB/min) over the second half of the run, and once settled after the last attack; tracebacks in
the two processes' logs (the first three, excerpted). Writes one JSON file (``bench/common.py``'s write_result).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moevit.sim.attacks import (  # noqa: E402
    CHANNEL_OPTIONS,
    ClassifyDeployment,
    attack_watches,
    classify,
    in_background,
    many_batches_request,
    png,
    progressive_bomb,
    refused_requests,
    rss_mb,
    settled_rss_mb,
)

from moevit_rpc.tensors import tensor_to_proto  # noqa: E402
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc  # noqa: E402

KINDS = ("bomb", "bomb_ok", "cancelled", "junk", "refused", "watches", "stream_cancel")


def _classify_full(stub: Any, image: bytes, deadline: float) -> tuple[str, list[tuple[int, float]] | None]:
    try:
        resp = stub.Classify(expert_pb2.ClassifyRequest(image=image, top_k=5), timeout=deadline)
    except grpc.RpcError as e:
        return e.code().name, None
    return "OK", [(p.index, p.probability) for p in resp.top]


def _matches(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return a[0][0] == b[0][0] and all(abs(pa - dict(b).get(i, -1.0)) <= 1e-4 for i, pa in a)


class Attacker:
    def __init__(self, dep: ClassifyDeployment) -> None:
        self.dep = dep
        self.codes: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        self.runs = dict.fromkeys(KINDS, 0)
        self.bomb, self.bomb_ok = progressive_bomb(), progressive_bomb(extra_scans=50)
        self.big = png((6000, 6000))
        self.junk = np.random.default_rng(1).bytes(16 << 20)
        requests = refused_requests(dep.fingerprint, 8, 128, 3)
        self.refused = [requests["tensor_wrong_fingerprint"].SerializeToString(),
                        requests["packed_entries_unhosted"].SerializeToString(),
                        many_batches_request(dep.fingerprint, 8)]
        x = torch.randn(100_000, 128)
        self.stream_req = expert_pb2.RunExpertsRequest(
            model_fingerprint=dep.fingerprint, layer=8, request_id="soak",
            packed=expert_pb2.PackedTokens(experts=[0], counts=[len(x)], tokens=tensor_to_proto(x, "fp32")))

    def _count(self, kind: str, code: str) -> None:
        self.codes[kind][code] = self.codes[kind].get(code, 0) + 1

    def run(self, kind: str, rng: random.Random) -> None:
        self.runs[kind] += 1
        address = self.dep.address
        if kind in ("bomb", "bomb_ok"):
            self._count(kind, classify(address, self.bomb if kind == "bomb" else self.bomb_ok, timeout=30)[0])
        elif kind == "cancelled":
            calls = [in_background(lambda: classify(address, self.big, timeout=0.1)) for _ in range(4)]
            for t, box in calls:
                t.join(10)
                self._count(kind, box[0][0] if box else "NO_ANSWER")
        elif kind == "junk":
            calls = [in_background(lambda: classify(address, self.junk, timeout=60)) for _ in range(4)]
            for t, box in calls:
                t.join(70)
                self._count(kind, box[0][0] if box else "NO_ANSWER")
        elif kind == "refused":
            with grpc.insecure_channel(self.dep.worker_address, options=CHANNEL_OPTIONS) as ch:
                unary = ch.unary_unary("/moevit.rpc.v1.ExpertService/RunExperts")
                for data in self.refused:
                    try:
                        unary(data, timeout=30)
                        self._count(kind, "OK")
                    except grpc.RpcError as e:
                        self._count(kind, e.code().name)
        elif kind == "watches":
            result = attack_watches(self.dep.worker_address, n=100)
            for code, n in result["watches"].items():
                self.codes[kind][code] = self.codes[kind].get(code, 0) + n
            self._count(kind, f"info:{result['info']['code']}")
        elif kind == "stream_cancel":
            with grpc.insecure_channel(self.dep.worker_address, options=CHANNEL_OPTIONS) as ch:
                call = expert_pb2_grpc.ExpertServiceStub(ch).RunExpertsStream(iter([self.stream_req]), timeout=30)
                timer = threading.Timer(rng.uniform(0.5, 4.0), call.cancel)
                timer.start()
                try:
                    for _ in call:
                        pass
                    self._count(kind, "OK")
                except grpc.RpcError as e:
                    self._count(kind, e.code().name)
                timer.cancel()


def run_soak(duration: float, seed: int, clients: int, images: int, deadline: float, gap: tuple[float, float],
             kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    rng = random.Random(seed)
    pictures = [png((64, 64), 100 + i) for i in range(images)]
    # batches of 1, so every answer can be compared with the reference exactly (a batch of two can move a patch
    # across a routing boundary and change the probabilities by more than the tolerance)
    with tempfile.TemporaryDirectory() as tmp, ClassifyDeployment(Path(tmp), "--max-batch", "1") as dep:
        pids = {"worker": dep.worker.pid, "coordinator": dep.proc.pid}
        with grpc.insecure_channel(dep.address, options=CHANNEL_OPTIONS) as ch:
            stub = expert_pb2_grpc.ClassifierServiceStub(ch)
            reference = []
            for p in pictures:
                code, top = _classify_full(stub, p, 30)
                assert code == "OK", code
                reference.append(top)
            stop = threading.Event()
            lock = threading.Lock()
            normal: dict[str, Any] = {"sent": 0, "ok": 0, "wrong": 0, "late": 0, "failed": {}, "latency": []}

            def client(k: int) -> None:
                i = k
                while not stop.is_set():
                    t0 = time.perf_counter()
                    code, top = _classify_full(stub, pictures[i % images], deadline)
                    dt = time.perf_counter() - t0
                    with lock:
                        normal["sent"] += 1
                        normal["latency"].append(dt)
                        if dt > deadline:
                            normal["late"] += 1
                        if code != "OK":
                            normal["failed"][code] = normal["failed"].get(code, 0) + 1
                        elif not _matches(top, reference[i % images]):
                            normal["wrong"] += 1
                        else:
                            normal["ok"] += 1
                    i += clients

            rss: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
            t_start = time.monotonic()

            def sampler() -> None:
                while not stop.is_set():
                    for name, pid in pids.items():
                        rss[name].append((time.monotonic() - t_start, rss_mb(pid)))
                    stop.wait(0.5)

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
            threads.append(threading.Thread(target=sampler, daemon=True))
            for t in threads:
                t.start()
            attacker = Attacker(dep)
            schedule: list[tuple[float, str]] = []
            while time.monotonic() - t_start < duration:
                if not kinds:  # normal traffic alone: the baseline the attacks' RSS is compared with
                    stop.wait(min(1.0, duration - (time.monotonic() - t_start)))
                    continue
                kind = rng.choice(kinds)
                schedule.append((round(time.monotonic() - t_start, 2), kind))
                attacker.run(kind, rng)
                time.sleep(rng.uniform(*gap))
            stop.set()
            for t in threads:
                t.join(deadline + 5)
            # after the last attack, once each process stopped freeing (and trimming) what the attacks left: a 36 MP
            # decode given up on still runs for seconds on a loaded machine, holding ~0.6 GB until it ends
            settled = {name: settled_rss_mb(pid, every_s=2.0, timeout_s=60.0) for name, pid in pids.items()}
        logs = {"worker": (dep.tmp / "worker.log").read_text(), "coordinator": dep.log.read_text()}
    lat = sorted(normal.pop("latency"))
    out: dict[str, Any] = {
        "config": {"duration_s": duration, "seed": seed, "clients": clients, "images": images,
                   "deadline_s": deadline, "gap_s": list(gap), "kinds": list(kinds)},
        "normal": {**normal, "latency_s": {"p50": round(statistics.median(lat), 4),
                                           "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
                                           "max": round(lat[-1], 4)}},
        "attacks": {"runs": attacker.runs, "codes": attacker.codes},
        "schedule": schedule,
        "rss_mb": {name: {**_rss_summary(samples), "settled_after": settled[name]} for name, samples in rss.items()},
        "tracebacks_in_logs": {name: text.count("Traceback") for name, text in logs.items()},
        "traceback_excerpts": {name: [t[:1500] for t in text.split("Traceback")[1:4]] for name, text in logs.items()
                               if "Traceback" in text},
    }
    return out


def _rss_summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    t = np.array([s[0] for s in samples])
    y = np.array([s[1] for s in samples])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], y[half], 1)[0] * 60) if half.sum() > 2 else None
    every_5s = [[round(float(a), 1), round(float(b), 1)] for a, b in zip(t[::10], y[::10], strict=True)]
    return {"samples_every_5s": every_5s,
            "start": round(float(y[0]), 1), "end": round(float(y[-1]), 1), "max": round(float(y.max()), 1),
            "second_half_mean": round(float(y[half].mean()), 1),
            "slope_mb_per_min_second_half": None if slope is None else round(slope, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of attacks (default 180)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=5.0, help="each normal request's deadline, s (default 5)")
    ap.add_argument("--gap", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated attack kinds to mix in (default all: {','.join(KINDS)}); 'none' for normal "
                         "traffic alone")
    ap.add_argument("--out", default="bench/results/soak_attacks.json")
    args = ap.parse_args(argv)
    kinds = () if args.kinds == "none" else tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"--kinds: unknown attack kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)} or 'none'")
    result = run_soak(args.duration, args.seed, args.clients, args.images, args.deadline, tuple(args.gap), kinds)
    import json

    print(json.dumps({k: v for k, v in result.items() if k != "schedule"}, indent=1))
    if args.out:
        from bench.common import write_result

        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
