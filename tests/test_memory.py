"""moevit_rpc.memory: the heap is trimmed after large requests only (the bound it serves is measured against real
processes in tests/test_attacks.py)."""

from __future__ import annotations

import asyncio

import pytest

from moevit_rpc.memory import LARGE_BYTES, HeapTrimmer, malloc_trim


def test_malloc_trim_is_available_on_glibc():
    assert malloc_trim() is True  # the deployments and CI run glibc (Debian); elsewhere the trimmer does nothing


@pytest.mark.parametrize(("size", "trims"), [(LARGE_BYTES - 1, False), (LARGE_BYTES, True)])
def test_only_a_large_request_causes_trims_and_they_stop_after_the_settling_time(size, trims):
    async def run() -> tuple[int, int]:
        trimmer = HeapTrimmer(tick_s=0.05, quiet_s=0.1, settle_s=0.3)
        trimmer.start()
        trimmer.note(64 << 10)  # small requests, as normal traffic
        trimmer.note(size)
        await asyncio.sleep(1.0)  # the last trim starts by 0.35 s: room for a loaded machine to finish it
        settled = trimmer.trims
        await asyncio.sleep(0.5)
        trimmer.stop()
        return settled, trimmer.trims

    settled, later = asyncio.run(run())
    assert settled == (2 if trims else 0)  # once quiet, once more after the settling time
    assert later == settled  # nothing more once SETTLE_S has passed without a large request


def test_no_trim_while_large_requests_keep_coming():
    """Each large request reuses the heap the previous one freed; a trim then would only hold the arenas' locks."""
    async def run() -> tuple[int, int]:
        trimmer = HeapTrimmer(tick_s=0.05, quiet_s=0.3, settle_s=0.6)
        trimmer.start()
        for _ in range(12):  # one every 0.05 s for 0.6 s
            trimmer.note(LARGE_BYTES)
            await asyncio.sleep(0.05)
        during = trimmer.trims
        await asyncio.sleep(1.5)
        trimmer.stop()
        return during, trimmer.trims

    assert asyncio.run(run()) == (0, 2)
