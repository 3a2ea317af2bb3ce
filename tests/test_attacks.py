"""Issue 21: attacks on real processes over loopback, each asserting the bound it must stay within.

The payloads and measurements live in ``bench/attacks.py`` (which prints the same figures for the closing note);
``bench/soak_attacks.py`` mixes them into normal traffic.
"""

from __future__ import annotations

import pytest

from bench.attacks import attack_refused, small_model, start_worker, stop


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(path, fingerprint) of the tests' small MoE model (layers 5 and 8, four experts, dim 128 at layer 8)."""
    return small_model(tmp_path_factory.mktemp("attacks"))


@pytest.mark.slow
def test_refused_requests_hold_no_memory_and_health_keeps_answering(model):
    """Item 1: refused unary RunExperts (wrong fingerprint, unhosted expert; 5 M packed entries, 8-32 MiB tensors),
    then 12 M empty batches in one 57 MiB request, then all of them again on a stream. Before: the worker went
    from 260 to 886 MB over 12 refused requests, the 57 MiB request ran on the event loop for over 60 s (health
    checks timed out at 5 s)."""
    path, fingerprint = model
    proc, address = start_worker(path, "8:0-2")
    try:
        result = attack_refused(address, proc.pid, fingerprint, layer=8, dim=128, unhosted=3, rounds=3, stream=True)
    finally:
        stop(proc)
    codes = result["codes"]
    assert codes.pop("stream") == ["FAILED_PRECONDITION", "INVALID_ARGUMENT"], result
    assert set(codes.values()) == {"FAILED_PRECONDITION", "INVALID_ARGUMENT"}, result
    assert result["rss_growth_after_warm_mb"] < 50, result
    assert result["health_worst_s"] < 0.5 and result["health_failures"] == 0, result
    assert result["many_batches_answer_s"] < 5, result
