"""What a pause costs: code run right after an idle gap vs the same code run back to back, on this machine.

Split inference runs the worker's request handler (and the coordinator's send and receive) once per MoE layer,
with 10-50 ms of trunk computation in between; the in-process model runs its experts in the middle of one
uninterrupted forward. This benchmark measures how much slower the same small pieces of work are when each call
follows a gap than when calls follow each other:

* micro: ``torch.empty`` [22, 128], one ``F.linear`` [22, 128] x [128, 64], numpy's finiteness check of 2816 float16
  values, and one expert in numpy (the two products, bias and SiLU), each after gaps of 0, 1, 5 and 15 ms of
  ``time.sleep`` and after 15 ms of a busy loop (the core kept running: what remains is not the idle state or the
  clock ramping up, but caches and TLBs refilled after other work on the host used them);
* handler: the worker's whole request handler in this process (parse the request, ``validate_and_run`` with the
  torch backend, serialise the answer) on a layer-8 request as one of three workers gets it at batch 1 (22 tokens
  of dim 128 over 6 experts, float16 on the wire), with the same gaps; wall and CPU time per call;
* backends: one expert call at 64 tokens by the worker's torch backend and by its onnxruntime backend (the
  figure of bench_split.py's onnx section, there timed back to back), with the same gaps;
* worker: a real ``moe-worker`` process (torch backend, one thread) on ``--worker-cpu`` answering the same request
  over a stream from this process on ``--client-cpu``, back to back and with 15 ms between requests: wall time per
  call and the CPU time per call of the worker and of this process (all threads, from /proc).

Run: ``.venv/bin/python bench/bench_cold.py`` (about a minute and a half; writes ``bench/results/cold.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, write_result  # noqa: E402

LAYER = 8
TOKENS = 22
EXPERTS = (0, 3, 6, 9, 12, 15)
# (name, seconds, busy): what happens between two timed calls
GAPS: tuple[tuple[str, float, bool], ...] = (("back_to_back", 0.0, False), ("sleep_1ms", 0.001, False),
                                             ("sleep_5ms", 0.005, False), ("sleep_15ms", 0.015, False),
                                             ("busy_15ms", 0.015, True))


def _pause(seconds: float, busy: bool) -> None:
    if seconds <= 0:
        return
    if not busy:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_after_gaps(fn: Callable[[], Any], calls: int, warmup: int = 10) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU microseconds of ``fn`` per gap kind (``GAPS``), ``calls`` timed calls each."""
    out = {}
    for name, seconds, busy in GAPS:
        for _ in range(warmup):
            fn()
        wall, cpu = [], []
        for _ in range(calls):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            fn()
            wall.append((time.perf_counter_ns() - w0) / 1e3)
            cpu.append((time.thread_time_ns() - c0) / 1e3)
            _pause(seconds, busy)
        out[name] = {"wall_us_p50": round(statistics.median(wall), 1), "cpu_us_p50": round(statistics.median(cpu), 1)}
    return out


def _with_slowdown(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    base = rows["back_to_back"]["wall_us_p50"]
    return {"us": rows, "slowdown_vs_back_to_back": {k: round(v["wall_us_p50"] / base, 2) for k, v in rows.items()}}


def micro(calls: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, 128, generator=g)
    w1, b1 = torch.randn(64, 128, generator=g), torch.randn(64, generator=g)
    w2, b2 = torch.randn(128, 64, generator=g), torch.randn(128, generator=g)
    data = torch.randn(TOKENS, 128, generator=g).half().numpy().tobytes()
    xn, w1t, w2t, b1n, b2n = x.numpy(), w1.t().contiguous().numpy(), w2.t().contiguous().numpy(), b1.numpy(), b2.numpy()

    def expert_numpy():
        h = xn @ w1t
        h += b1n
        h *= 1.0 / (1.0 + np.exp(-h))
        y = h @ w2t
        y += b2n
        return y

    pieces: dict[str, Callable[[], Any]] = {
        "torch_empty": lambda: torch.empty(TOKENS, 128),
        "torch_linear": lambda: F.linear(x, w1, b1),
        "numpy_isfinite_fp16": lambda: np.isfinite(np.frombuffer(data, dtype="<f2")).all(),
        "numpy_expert": expert_numpy,
    }
    return {name: _with_slowdown(time_after_gaps(fn, calls)) for name, fn in pieces.items()}


def _model(workdir: Path):
    from bench.bench_split import build_model
    from moevit.checkpoint import model_fingerprint, save_checkpoint

    model = build_model((LAYER,), calibrate=False)
    return model, model_fingerprint(model), save_checkpoint(model, workdir / "moe8.safetensors")


def _batches(dim: int):
    import torch

    x = torch.randn(TOKENS, dim, generator=torch.Generator().manual_seed(1))
    return [(e, x[i::len(EXPERTS)]) for i, e in enumerate(EXPERTS)]


def handler(model, fingerprint: str, calls: int) -> dict[str, Any]:
    import torch
    from moevit.worker.backends import TorchBackend
    from moevit.worker.service import validate_and_run

    from moevit_rpc.tensors import tensor_to_proto
    from moevit_rpc.v1 import expert_pb2

    bank = model.moe_layers()[LAYER].experts
    backend = TorchBackend({LAYER: bank})
    batches = _batches(bank.dim)
    req = expert_pb2.RunExpertsRequest(model_fingerprint=fingerprint, layer=LAYER, request_id="r1")
    req.packed.experts.extend(e for e, _ in batches)
    req.packed.counts.extend(len(x) for _, x in batches)
    req.packed.tokens.CopyFrom(tensor_to_proto(torch.cat([x for _, x in batches]), "fp16"))
    data = req.SerializeToString()
    hosted = {LAYER: frozenset(bank.expert_ids)}

    def one() -> bytes:
        request = expert_pb2.RunExpertsRequest.FromString(data)
        return validate_and_run(backend, hosted, fingerprint, request).SerializeToString()

    with torch.inference_mode():
        return _with_slowdown(time_after_gaps(one, calls))


def backends(model, fingerprint: str, workdir: Path, calls: int) -> dict[str, Any]:
    import torch
    from moevit.worker.backends import OnnxBackend, TorchBackend

    bank = model.moe_layers()[LAYER].experts
    banks = {LAYER: bank.subset(list(bank.expert_ids))}
    torch_backend = TorchBackend(banks)
    onnx_backend = OnnxBackend(banks, fingerprint, workdir / "onnx-cache", threads=1)
    x = torch.randn(64, bank.dim, generator=torch.Generator().manual_seed(2))
    out = {"torch_expert_64": _with_slowdown(time_after_gaps(lambda: torch_backend.run(LAYER, 3, x), calls)),
           "onnxruntime_expert_64": _with_slowdown(time_after_gaps(lambda: onnx_backend.run(LAYER, 3, x), calls))}
    out["onnxruntime_vs_torch"] = {k: round(out["onnxruntime_expert_64"]["us"][k]["wall_us_p50"]
                                            / out["torch_expert_64"]["us"][k]["wall_us_p50"], 3)
                                   for k, *_ in GAPS}
    return out


def worker(model_path: Path, fingerprint: str, dim: int, calls: int, worker_cpu: int | None) -> dict[str, Any]:
    from moevit.coordinator.local import free_port, stop_process, wait_serving
    from moevit.coordinator.sites import SiteClient

    from bench.bench_split import pin_pid, proc_cpu_seconds, start_worker

    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(address, model_path)
    client = None
    try:
        wait_serving(address, proc)
        pin_pid(proc.pid, {worker_cpu} if worker_cpu is not None else None)
        client = SiteClient("w", address, fingerprint=fingerprint, wire="fp16", watch=False)
        batches = _batches(dim)
        out = {}
        for name, gap in (("back_to_back", 0.0), ("sleep_15ms", 0.015)):
            for _ in range(30):
                client.start(LAYER, batches).result()
                time.sleep(gap)
            walls = []
            w_cpu0, c_cpu0 = proc_cpu_seconds(proc.pid), time.process_time()
            for _ in range(calls):
                t0 = time.perf_counter()
                client.start(LAYER, batches).result()
                walls.append((time.perf_counter() - t0) * 1e3)
                time.sleep(gap)
            out[name] = {"wall_ms_p50": round(statistics.median(walls), 3),
                         "worker_cpu_ms_per_call": round((proc_cpu_seconds(proc.pid) - w_cpu0) * 1e3 / calls, 3),
                         "client_cpu_ms_per_call": round((time.process_time() - c_cpu0) * 1e3 / calls, 3)}
        return out
    finally:
        if client is not None:
            client.close()
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per piece and gap")
    ap.add_argument("--worker-calls", type=int, default=300, help="timed requests to the worker process per gap")
    ap.add_argument("--client-cpu", type=int, default=0, help="core of this process (with two cores or more)")
    ap.add_argument("--worker-cpu", type=int, default=1, help="core of the micro and handler timings and the worker")
    ap.add_argument("--out", default="bench/results/cold.json")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.worker_calls < 1:
        ap.error("--calls and --worker-calls must be at least 1")
    two = (os.cpu_count() or 1) >= 2
    import torch

    torch.set_num_threads(1)
    loadavg_before = load_average()
    result: dict[str, Any] = {"benchmark": "cold", "description": __doc__.split("\n\n")[0],
                              "settings": {"calls": args.calls, "worker_calls": args.worker_calls, "layer": LAYER,
                                           "tokens": TOKENS, "experts": list(EXPERTS), "torch_threads": 1,
                                           "client_cpu": args.client_cpu if two else None,
                                           "worker_cpu": args.worker_cpu if two else None},
                              "loadavg_before": loadavg_before}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, fingerprint, path = _model(Path(tmp))
        if two:
            os.sched_setaffinity(0, {args.worker_cpu})
        print("micro pieces ...", flush=True)
        result["micro"] = micro(args.calls)
        print("the worker's handler in-process ...", flush=True)
        result["handler"] = handler(model, fingerprint, args.calls)
        print("one expert call, torch and onnxruntime backends ...", flush=True)
        result["backends"] = backends(model, fingerprint, Path(tmp), args.calls)
        if two:
            os.sched_setaffinity(0, {args.client_cpu})
        print("a moe-worker process ...", flush=True)
        result["worker"] = worker(path, fingerprint, model.moe_layers()[LAYER].experts.dim, args.worker_calls,
                                  args.worker_cpu if two else None)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = write_result(args.out, result)
    print("\n| piece | back to back | after 1 / 5 / 15 ms asleep | after 15 ms busy |\n|---|---|---|---|")
    b = result["backends"]
    rows = [*result["micro"].items(), ("worker handler", result["handler"]),
            ("torch backend, one expert, 64 tokens", b["torch_expert_64"]),
            ("onnxruntime backend, same", b["onnxruntime_expert_64"])]
    for name, r in rows:
        us, s = r["us"], r["slowdown_vs_back_to_back"]
        print(f"| {name} | {us['back_to_back']['wall_us_p50']:.1f} µs | "
              f"{s['sleep_1ms']:.1f}x / {s['sleep_5ms']:.1f}x / {s['sleep_15ms']:.1f}x | {s['busy_15ms']:.1f}x |")
    print("onnxruntime ÷ torch, one expert call: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                              b["onnxruntime_vs_torch"].items()))
    w = result["worker"]
    for name, r in w.items():
        print(f"moe-worker, {name}: {r['wall_ms_p50']:.3f} ms per call; CPU per call: worker "
              f"{r['worker_cpu_ms_per_call']:.3f} ms, client {r['client_cpu_ms_per_call']:.3f} ms")
    print(f"\nload average before {loadavg_before}, after {load_average()}; {result['seconds']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
