"""Whether a worker site is up, as the coordinator sees it: a background watch of the site's standard gRPC health
service, plus a short penalty after a call to it fails.

A site is *up* when its health stream last said SERVING and it is not serving a penalty: a call that fails (or
loses a hedge) keeps the site out for ``penalty_s`` seconds, doubled for each failure in a row up to
``max_penalty_s``, and a call that answers clears the count. The watch reconnects every ``retry_s`` while the site
is unreachable (the channel's own reconnect backoff is capped at 1 s, see :mod:`moevit_rpc.channels`), so a
worker that comes back is used again within about a second of reporting SERVING. A failed call only penalises the
site for a while: the watch stream may still be open (a worker that is alive but overloaded, a link that stopped
forwarding before keepalive notices), so the site is tried again after the penalty rather than waiting for a
status change that may never come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("moevit.coordinator")

SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthWatch:
    """Tracks one site's health on a daemon thread; :attr:`up` is cheap to read from any thread."""

    def __init__(self, name: str, channel: grpc.Channel, *, retry_s: float = 0.2, penalty_s: float = 0.5,
                 max_penalty_s: float = 30.0, on_change: Callable[[str, bool], None] | None = None,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self.name, self.retry_s, self.penalty_s, self.on_change = name, retry_s, penalty_s, on_change
        # the site's bearer token: workers keep most of their health watches for callers that carry it
        self.metadata = metadata
        self.max_penalty_s = max_penalty_s
        self._strikes = 0
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._serving = False
        self._penalty_until = 0.0
        self._call: grpc.Call | None = None
        self._closed = threading.Event()
        self._seen = threading.Event()  # set once the first status (or failure) is known
        self.serving_since: float | None = None
        self.transitions = 0
        self._thread = threading.Thread(target=self._run, name=f"health-{name}", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self._serving and time.monotonic() >= self._penalty_until

    @property
    def serving(self) -> bool:
        """What the health stream last said, ignoring call penalties."""
        return self._serving

    def wait_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.up and time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(0.02)
        return self.up

    def penalize(self) -> None:
        """A call to the site failed or was too slow: route around it for ``penalty_s`` seconds, doubled for each
        failure in a row (up to ``max_penalty_s``), so a link that stays silent is not tried on every forward."""
        self._strikes += 1
        wait = min(self.penalty_s * 2 ** min(self._strikes - 1, 16), self.max_penalty_s)
        self._penalty_until = time.monotonic() + wait

    def succeeded(self) -> None:
        """A call to the site answered: forget earlier failures."""
        self._strikes = 0

    def _set(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            self.transitions += 1
            if serving:
                self.serving_since = time.monotonic()
                self._penalty_until = 0.0  # a fresh SERVING clears what earlier failures said
                self._strikes = 0
            # the first SERVING is the normal start; every later change is news a person watching the run wants
            log.log(logging.WARNING if self.transitions > 1 else logging.DEBUG,
                    "site %s is %s", self.name, "back (SERVING): using it again" if serving else
                    "down (health stream lost or not SERVING): its experts go to replicas or the fallback")
            if self.on_change is not None:
                self.on_change(self.name, serving)
        self._seen.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._call = self._stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=self.metadata)
                for resp in self._call:
                    self._set(resp.status == SERVING)
            except grpc.RpcError:
                pass
            except ValueError:  # the channel was closed under us
                break
            if self._closed.is_set():  # our own close(), not the site's doing
                break
            self._set(False)
            self._closed.wait(self.retry_s)

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()


__all__ = ["HealthWatch"]
