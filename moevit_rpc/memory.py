"""Giving the heap that large requests used back to the system (glibc's ``malloc_trim``), for the servers.

gRPC receives a message in many small slices, allocated by its threads from glibc's per-thread arenas. When the
message is freed, those chunks are free heap in the middle of the arenas, which glibc keeps: it returns memory to
the system only from an arena's top. Measured on the Classify server (``bench/attacks.py classify-flood``, 16 x 48
MiB junk requests): after two floods 134 MB of free heap stayed resident (RSS 264 -> 416 MB, still rising with
each flood), and ``malloc_trim(0)`` brought it back to 286 MB. Neither a fixed mmap threshold (256 KiB) nor two
arenas (``M_ARENA_MAX``) changed it: the slices are small. So servers call :meth:`HeapTrimmer.note` for every
request of :data:`LARGE_BYTES` or more (when it arrives; the Classify server, whose requests may wait in its queue
for seconds, also when it is answered), and the trimmer calls ``malloc_trim(0)`` on a thread of its own once
they have stopped for :data:`QUIET_S` (gRPC frees a message after its handler returns), and once more
:data:`SETTLE_S` after the last one (an admitted request is freed only once computed); smaller requests never cause
a trim. Not while large requests keep coming: each reuses the heap the previous one freed, and a trim holds each
arena's lock while it walks it (one that released 540 MB took 151 ms, one with nothing to release 1-9 ms, on the
loaded 2-core machine), which the event loop's allocations wait for. Where glibc is not the C library, the trimmer
does nothing.

Trimming alone did not keep a server flat under mixed attacks: ``malloc_trim`` returns the free pages inside every
arena but trims only the main arena's top, and a thread arena's free top goes back only once it exceeds the trim
threshold, which glibc raises with its dynamic mmap threshold up to 64 MiB. Threads that decoded a 36 MP image or
received a 16-32 MiB message (the decode threads, gRPC's) kept that much each: after the attack soak
(``bench/soak_attacks.py --duration 180``) the Classify server's thread arenas held 110 MB, settled. So the servers
run with one arena (:func:`one_arena`, first thing in their ``main``, before any other thread allocates): every
thread allocates from the main arena, whose top a trim does return; the same soak then settles within +8 MB on
both servers. Fixing the mmap threshold at 8 MiB instead kept them flat too, but unmapped every large tensor when
freed and faulted it in again on the next forward: MobileViTV2-0.5 at 256 px, batch 8, one thread, 271-299 ms per
forward against 187-201 ms (one arena: 190-211 ms).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LARGE_BYTES", "HeapTrimmer", "malloc_trim", "one_arena"]

# A request this large (bytes) leaves enough free heap behind to be worth a trim; normal expert calls and images
# are far smaller and never cause one.
LARGE_BYTES = 4 << 20
# How often the trimmer looks; how long large requests must have stopped before it trims; when it trims again
# after the last one.
TICK_S = 0.5
QUIET_S = 1.0
SETTLE_S = 5.0


_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _libc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


def one_arena() -> bool:
    """Make every thread that allocates from now on use glibc's main arena (``mallopt(M_ARENA_MAX, 1)``; a thread
    that allocated already keeps its arena, so call it before starting any); False where ``mallopt`` is not
    available or refuses it."""
    return _MALLOPT is not None and _MALLOPT(_M_ARENA_MAX, 1) == 1


def malloc_trim() -> bool:
    """Return the free heap of every arena to the system; False where glibc's ``malloc_trim`` is not available."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class HeapTrimmer:
    """Trims the heap after large requests. :meth:`note` (any thread) with each request's size; :meth:`start` on
    the server's event loop, :meth:`stop` when it stops. ``trims`` counts the trims done."""

    def __init__(self, large_bytes: int = LARGE_BYTES, tick_s: float = TICK_S, quiet_s: float = QUIET_S,
                 settle_s: float = SETTLE_S) -> None:
        self.large_bytes, self.tick_s, self.quiet_s, self.settle_s = large_bytes, tick_s, quiet_s, settle_s
        self.trims = 0
        self._last_large = float("-inf")
        self._pending = self._follow_up = False
        self._task: asyncio.Task | None = None

    @property
    def available(self) -> bool:
        return _MALLOC_TRIM is not None

    def note(self, nbytes: int) -> None:
        if nbytes >= self.large_bytes:
            self._last_large = time.monotonic()
            self._pending = True

    def start(self) -> None:
        if self.available and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _due(self, now: float) -> bool:
        if self._pending and now - self._last_large >= self.quiet_s:
            self._pending, self._follow_up = False, True
            return True
        if self._follow_up and not self._pending and now - self._last_large >= self.settle_s:
            self._follow_up = False
            return True
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            if self._due(now):
                # on a thread: a trim walks every arena, which the event loop should not wait for
                await loop.run_in_executor(None, malloc_trim)
                self.trims += 1
