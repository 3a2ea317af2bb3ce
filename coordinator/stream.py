"""One long-lived ``RunExpertsStream`` call to a worker, shared by every thread that sends that site requests.

Requests go out in the order they are submitted; the worker answers them in order, echoing ``request_id``, and a
reader thread completes each request's future with its answer, or with the worker's refusal (``error_code``), or
with the stream's error once the stream has ended. A stream that has ended takes no more requests: the site's
client opens a new one for the next request.

Why a stream: in grpc-python most of a small call's cost is setting the call up and tearing it down, on both
ends (bench/bench_transport.py, 3 echo servers sharing a core: a layer of three requests 2.32 ms over unary calls,
1.29 ms over streams; servers' CPU 2.10 vs 0.95 ms). A request abandoned on a stream (deadline passed) is still
computed by the worker and its answer dropped here; calls that must be cancellable (hedges) use unary
``RunExperts``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import grpc

from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger("moevit.coordinator")

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_END = object()  # ends the request iterator, which half-closes the stream


class StreamError(grpc.RpcError):
    """A request's failure on a stream, shaped like the error of a unary call (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def code_from_number(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


class ExpertStream:
    """A ``RunExpertsStream`` call on ``stub``. :meth:`submit` sends a request and returns the future of its answer
    (None once the stream has ended). ``on_unimplemented`` receives the requests still unanswered (with their
    futures) when the worker does not implement streams, so the caller can send them another way."""

    def __init__(self, stub: expert_pb2_grpc.ExpertServiceStub, *, name: str,
                 metadata: Sequence[tuple[str, str]] | None = None,
                 on_unimplemented: Callable[[list[tuple[expert_pb2.RunExpertsRequest,
                                                         concurrent.futures.Future]]], None] | None = None) -> None:
        self.name = name
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, tuple[expert_pb2.RunExpertsRequest, concurrent.futures.Future]] = {}
        self._lock = threading.Lock()
        self._ended: StreamError | None = None
        self._on_unimplemented = on_unimplemented
        self._call = stub.RunExpertsStream(iter(self._requests.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name=f"stream-{name}", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def error(self) -> StreamError | None:
        """Why the stream ended (None while it is open)."""
        return self._ended

    def submit(self, request: expert_pb2.RunExpertsRequest) -> concurrent.futures.Future | None:
        """Send ``request`` (its ``request_id`` unique on this stream); the future completes with the
        ``RunExpertsResponse`` or a :class:`StreamError`. Cancelling the future abandons the request."""
        rid = request.request_id
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._ended is not None:
                return None
            if rid in self._pending:  # its answer would be taken for the other's
                raise ValueError(f"request_id {rid!r} is already waiting for an answer on this stream")
            self._pending[rid] = (request, fut)
        fut.add_done_callback(lambda f: f.cancelled() and self._forget(rid))
        self._requests.put(request)
        return fut

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def _read(self) -> None:
        ended = StreamError(grpc.StatusCode.UNAVAILABLE, "the worker ended the expert stream (shutting down?)")
        try:
            for resp in self._call:
                with self._lock:
                    entry = self._pending.pop(resp.request_id, None)
                if entry is None:  # the answer to a request abandoned meanwhile
                    continue
                fut = entry[1]
                try:
                    if resp.error_code:
                        fut.set_exception(StreamError(code_from_number(resp.error_code), resp.error_message))
                    else:
                        fut.set_result(resp)
                except concurrent.futures.InvalidStateError:  # cancelled as the answer arrived
                    pass
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            ended = StreamError(code or grpc.StatusCode.UNKNOWN, details or "the expert stream failed")
        with self._lock:
            self._ended = ended
            pending, self._pending = list(self._pending.values()), {}
        self._requests.put(_END)  # grpc's thread that consumes the requests finishes
        if ended.code() == grpc.StatusCode.UNIMPLEMENTED and self._on_unimplemented is not None:
            log.warning("site %s: the worker does not implement RunExpertsStream; using RunExperts", self.name)
            self._on_unimplemented(pending)
            return
        for _, fut in pending:
            try:
                fut.set_exception(ended)
            except concurrent.futures.InvalidStateError:
                pass

    def close(self) -> None:
        """End the stream; requests still unanswered fail with CANCELLED."""
        self._requests.put(_END)
        self._call.cancel()
