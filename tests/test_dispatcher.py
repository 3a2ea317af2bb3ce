"""The remote dispatcher's decisions without a network: replica choice, retries, hedging, and the four fallbacks.

Sites are in-process stand-ins that answer through the worker's own request path
(:func:`worker.service.validate_and_run`), fail, or answer late; everything else is the coordinator's real code.
The same behaviours over real processes and sockets are in tests/test_faults.py.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest
import torch
from moevit.coordinator.dispatcher import CallPolicy, DispatchCounters, ForwardContext, RemoteDispatcher
from moevit.coordinator.sites import PendingCall, SiteError, Traffic
from moevit.worker.backends import TorchBackend
from moevit.worker.service import validate_and_run

import moevit
from moevit.checkpoint import model_fingerprint
from moevit_rpc.tensors import tensor_to_proto
from moevit_rpc.v1 import expert_pb2
from tests.deploy import small_moe_model

LAYERS = (1, 5, 8)
E = 6


class FakeSite:
    """A site answering through the worker's request handling; ``mode`` ok | fail | slow | down."""

    def __init__(self, name: str, model: moevit.MobileViTV2, mode: str = "ok", delay: float = 0.3) -> None:
        self.name, self.mode, self.delay = name, mode, delay
        self.backend = TorchBackend({i: layer.experts for i, layer in model.moe_layers().items()})
        self.fingerprint = model_fingerprint(model)
        self.hosted = {layer: set(range(E)) for layer in LAYERS}
        self.traffic = Traffic()
        self.watch = None
        self.calls = 0
        self.cancelled = 0

    @property
    def up(self) -> bool:
        return self.mode != "down"

    def start(self, layer, batches, *, timeout=None, cancellable=False):
        self.calls += 1
        req = expert_pb2.RunExpertsRequest(model_fingerprint=self.fingerprint, layer=layer, batches=[
            expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(x, "fp32")) for e, x in batches])
        fut: concurrent.futures.Future = concurrent.futures.Future()
        site = self

        class Rpc:
            def cancel(self) -> None:
                site.cancelled += 1
                fut.cancel()

        if self.mode == "fail":
            err = grpc.RpcError()
            err.code = lambda: grpc.StatusCode.UNAVAILABLE  # type: ignore[method-assign]
            err.details = lambda: "connection reset"  # type: ignore[method-assign]
            fut.set_exception(err)
        elif self.mode == "slow":
            def later() -> None:
                time.sleep(self.delay)
                if not fut.cancelled():
                    fut.set_result(validate_and_run(self.backend, self.hosted, self.fingerprint, req))
            threading.Thread(target=later, daemon=True).start()
        else:
            fut.set_result(validate_and_run(self.backend, self.hosted, self.fingerprint, req))
        counts = [len(x) for _, x in batches]
        return PendingCall(self, fut, 0, counts, time.perf_counter(), Rpc() if cancellable else None)


@pytest.fixture(scope="module")
def model():
    return small_moe_model(LAYERS, num_experts=E, calib_size=64)


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _reference(model, x, masked: set[int] = frozenset()):
    ref = moevit.build_model(model.config)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    mask = torch.zeros(E)
    mask[sorted(masked)] = float("-inf")
    for layer in ref.moe_layers().values():
        layer.router.register_forward_hook(lambda _m, _i, out: out + mask)
    with torch.no_grad():
        return ref(x)


def _split(model, sites: dict[str, FakeSite], replicas: dict[int, tuple[str, ...]], policy: CallPolicy):
    """A copy of ``model`` whose MoE layers dispatch over ``sites`` ('cam' = in-process)."""
    m = moevit.build_model(model.config)
    m.load_state_dict(model.state_dict())
    m.eval()
    ctx, counters = ForwardContext(), DispatchCounters()
    for i, layer in m.moe_layers().items():
        local = [e for e, s in replicas.items() if "cam" in s]
        bank = layer.experts if policy.fallback == "local" else layer.experts.subset(local)
        layer.set_dispatcher(RemoteDispatcher(i, bank, replicas, sites, local_site="cam", context=ctx,
                                              policy=policy, counters=counters))
    return m, ctx, counters


def _run(m, ctx, x):
    ctx.begin(len(x))
    with torch.no_grad():
        return m(x)


def test_a_failed_call_is_retried_on_the_next_replica(model, x):
    sites = {"a": FakeSite("a", model, "fail"), "b": FakeSite("b", model)}
    m, ctx, counters = _split(model, sites, {e: ("a", "b") for e in range(E)}, CallPolicy(fallback="fail"))
    torch.testing.assert_close(_run(m, ctx, x), _reference(model, x), atol=0, rtol=0)
    assert counters.retries == len(LAYERS) and not ctx.degraded.any()
    assert sites["a"].calls == len(LAYERS) and sites["b"].calls == len(LAYERS)


def test_a_site_known_down_is_not_called(model, x):
    sites = {"a": FakeSite("a", model, "down"), "b": FakeSite("b", model)}
    m, ctx, counters = _split(model, sites, {e: ("a", "b") for e in range(E)}, CallPolicy())
    torch.testing.assert_close(_run(m, ctx, x), _reference(model, x), atol=0, rtol=0)
    assert sites["a"].calls == 0 and counters.retries == 0


def test_the_coordinators_own_copy_comes_first(model, x):
    sites = {"a": FakeSite("a", model)}
    m, ctx, _ = _split(model, sites, {e: ("a", "cam") for e in range(E)}, CallPolicy())
    torch.testing.assert_close(_run(m, ctx, x), _reference(model, x), atol=0, rtol=0)
    assert sites["a"].calls == 0


def test_a_slow_call_is_hedged_and_the_loser_cancelled(model, x):
    sites = {"a": FakeSite("a", model, "slow", delay=3.0), "b": FakeSite("b", model)}
    m, ctx, counters = _split(model, sites, {e: ("a", "b") for e in range(E)}, CallPolicy(hedge_ms=20))
    t0 = time.monotonic()
    out = _run(m, ctx, x)
    assert time.monotonic() - t0 < 3.0  # never waited for the slow site (3 s per layer)
    torch.testing.assert_close(out, _reference(model, x), atol=0, rtol=0)
    assert counters.hedges == len(LAYERS) and counters.hedge_wins == len(LAYERS)
    assert sites["a"].cancelled == len(LAYERS)


def test_no_answer_within_the_deadline_falls_back(model, x):
    sites = {"a": FakeSite("a", model, "slow", delay=5.0)}
    m, ctx, _ = _split(model, sites, {e: ("a",) for e in range(E)}, CallPolicy(deadline_s=0.1, fallback="skip"))
    t0 = time.monotonic()
    _run(m, ctx, x)
    assert time.monotonic() - t0 < 4.0  # one 0.1 s deadline per layer, never the site's 5 s
    assert ctx.degraded.all() and any("DEADLINE_EXCEEDED" in f for f in ctx.failures)


def test_fail_names_the_site(model, x):
    sites = {"north": FakeSite("north", model, "fail")}
    m, ctx, _ = _split(model, sites, {e: ("north",) if e < 3 else ("cam",) for e in range(E)}, CallPolicy())
    with pytest.raises(SiteError, match="site north: UNAVAILABLE"):
        _run(m, ctx, x)


def test_concurrent_forwards_keep_their_own_degraded_flags(model):
    """Two threads classify batches of different sizes through one set of dispatchers: each gets its own flags."""
    sites = {"gone": FakeSite("gone", model, "down")}
    replicas = {e: ("gone",) if e < 3 else ("cam",) for e in range(E)}
    m, ctx, _ = _split(model, sites, replicas, CallPolicy(fallback="skip"))
    errors: list[str] = []

    def work(n: int) -> None:
        xs = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))
        for _ in range(15):
            ctx.begin(n)
            with torch.no_grad():
                m(xs)
            if ctx.degraded.shape != (n,):
                errors.append(f"batch of {n} got flags of shape {tuple(ctx.degraded.shape)}")

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.mark.parametrize("fallback", ["local", "skip", "nearest"])
def test_fallbacks(model, x, fallback):
    gone = {0, 3}
    sites = {"gone": FakeSite("gone", model, "down"), "b": FakeSite("b", model)}
    replicas = {e: ("gone",) if e in gone else ("b",) for e in range(E)}
    m, ctx, counters = _split(model, sites, replicas, CallPolicy(fallback=fallback))
    out = _run(m, ctx, x)
    assert counters.fallback_tokens > 0
    if fallback == "local":  # the coordinator's copy: exact, but still marked degraded
        torch.testing.assert_close(out, _reference(model, x), atol=0, rtol=0)
    elif fallback == "nearest":  # = the model with the lost experts masked out of its routers
        torch.testing.assert_close(out, _reference(model, x, gone), atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(out, _reference(model, x), atol=1e-3)
    assert ctx.degraded.all()
    assert any("gone" in f for f in ctx.failures)
