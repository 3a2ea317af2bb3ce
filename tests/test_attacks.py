"""Issue 21: attacks on real processes over loopback, each asserting the bound it must stay within.

The payloads and measurements live in ``sim/attacks.py`` (``bench/attacks.py`` prints the same figures as JSON);
``bench/soak_attacks.py`` mixes them into normal traffic.
"""

from __future__ import annotations

import pytest
from moevit.sim.attacks import (
    ClassifyDeployment,
    attack_bomb,
    attack_flood,
    attack_refused,
    attack_watches,
    settled_rss_mb,
    small_model,
    start_worker,
    stop,
)


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
    # from the very first request: before the heap was trimmed after large requests (moevit_rpc.memory), glibc
    # kept their free heap and the growth after the first round alone was 3.6-51.7 MB; now +15.6 MB in all
    assert result["rss_growth_mb"] < 50, result
    # Health keeps answering because no refused request holds the worker's event loop (where health is answered)
    # for as long as the 0.5 s health must answer within: each request, sent alone, costs the loop's thread 4-150 ms
    # of CPU here; with the wire screen off, 292-452 ms for the packed requests and 1,219 ms for the 57 MiB one
    # (tests' worker with service.SCREEN_MIN_BYTES raised); before the size checks, over 60 s. CPU time, as load
    # inflates wall time; the median of the 3 rounds, as on the shared CI machine one round of the 32 MiB
    # wrong-fingerprint tensor took 860 ms of the loop's CPU where the same request on the stream took at most 92
    # ms (fresh pages touched, or time the host took from the virtual CPU), and a cost that is not paid every time
    # is not the request's. All its threads together (receiving the bytes, trimming the heap after them) are held
    # to twice that: 14-167 ms here, up to 317 ms on the CI machine, whose page faults cost more. The slowest health
    # answer itself (0.13 s quiet, past 0.5 s in runs at load 8-15) is the benchmark's figure
    # (bench/attacks.py worker-refused --rounds 3 --stream).
    assert max(result["request_loop_cpu_ms_median"].values()) < 500, result
    assert max(result["request_cpu_ms_median"].values()) < 1000, result
    assert result["health_failures"] == 0, result  # every check answered within its 5 s
    assert result["many_batches_answer_s"] < 5, result


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "s3cret-token"])
def test_health_watches_cannot_starve_expert_calls(model, tmp_path, token):
    """Item 3: 254 idle Health.Watch streams without a token (health needs none). Before: they took the worker's
    256 RPC slots and every new call, RunExperts with a valid token included, waited or failed. Now watches have a
    budget of their own (64; 8 without the token where one is configured) and the coordinator's, carrying the
    token, still gets one."""
    extra = ()
    if token:
        (tmp_path / "token").write_text(token + "\n")
        extra = ("--token-file", str(tmp_path / "token"))
    proc, address = start_worker(model[0], "8:0-2", *extra)
    try:
        result = attack_watches(address, token=token)
    finally:
        stop(proc)
    assert result["watches"] == ({"OPEN": 8, "RESOURCE_EXHAUSTED": 246} if token else
                                 {"OPEN": 64, "RESOURCE_EXHAUSTED": 190}), result
    assert result["info"]["code"] == "OK" and result["info"]["s"] < 2, result
    assert result["watch_with_token"] == ("OPEN" if token else "RESOURCE_EXHAUSTED"), result


@pytest.fixture(scope="module")
def classify_server(tmp_path_factory):
    from moevit.coordinator.local import free_port

    metrics_port = free_port()
    with ClassifyDeployment(tmp_path_factory.mktemp("classify"), "--metrics-port",
                            f"127.0.0.1:{metrics_port}") as dep:
        dep.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield dep


@pytest.mark.slow
def test_a_legitimate_request_does_not_wait_behind_decoding_bombs(classify_server):
    """Item 2: progressive-JPEG bombs (2000x2000, 406 scans: 4.4 s of decoding each before, on the forward thread
    every request waits on), bombs within the limits (56 scans, decoded on the decode threads), and 8 large PNGs
    whose callers gave up after 0.1 s (dropped before decoding). A 64-px PNG is answered within 2 s each time. The
    decodes leave the server's RSS where it was: before, what the decode threads freed stayed in their arenas
    (here +43.2 MB; +13.4 MB with the heap trimmed after each heavy decode but the threads on arenas of their own;
    -0.2 MB with both fixes, moevit_rpc.memory; +238 MB settled after 73 rounds of cancelled PNGs in
    bench/soak_attacks.py --kinds cancelled --duration 100)."""
    result = attack_bomb(classify_server.address, classify_server.proc.pid)
    assert [a[0] for a in result["bomb_answers"]] == ["INVALID_ARGUMENT"] * 2, result
    for key in ("legit_behind_bombs", "legit_behind_bombs_within_limits", "legit_after_cancelled"):
        assert result[key]["code"] == "OK" and result[key]["s"] < 2.0, (key, result)
    assert all(a[0] == "OK" for a in result["bomb_within_limits_answers"]), result
    assert result["rss_growth_mb"] < 10, result


@pytest.mark.slow
def test_classify_server_bounds_its_queue_and_memory_and_counts_unreadable_images(classify_server):
    """Item 6 and serve-mode metrics: three floods of 16 concurrent 48 MiB junk requests are all refused
    (RESOURCE_EXHAUSTED beyond the queue's 128 MiB, INVALID_ARGUMENT for those decoded: not images), a legitimate
    request is answered after each, every unreadable image is counted in
    moevit_coordinator_images_total{outcome="unreadable"}, the server's RSS grows < 50 MB over the three, and the
    settled RSS after the last flood falls < 20 MB more once the next request comes (nothing held until then). Before:
    1,124 -> 1,529 -> 1,720 MB after each flood (the errors' tracebacks kept the requests in reference cycles, and
    glibc kept the freed heap); measured now 264 -> 285 -> 288 -> 291 MB."""
    import re
    import urllib.request

    def unreadable() -> float:
        text = urllib.request.urlopen(classify_server.metrics, timeout=10).read().decode()
        return float(re.search(r'moevit_coordinator_images_total\{outcome="unreadable"\} (\S+)', text)[1])

    from moevit.sim import attacks

    pid = classify_server.proc.pid
    start = settled_rss_mb(pid)
    floods = []
    for i in range(3):
        before = unreadable()
        with pytest.MonkeyPatch.context() as mp:
            if i < 2:
                # only the last flood's settled RSS is asserted: the first two skip attack_flood's settling (>= 8 s
                # of sleep each), so the next flood lands before the server's heap trims, which is no easier on it
                mp.setattr(attacks, "settled_rss_mb", attacks.rss_mb)
            result = attack_flood(classify_server.address, pid)
        floods.append(result)
        # every junk request is refused; whether some meet the queue's bound (RESOURCE_EXHAUSTED) depends on how
        # many overlap, which a fast machine may never reach: the bound itself is tested deterministically in
        # tests/test_server_batching.py::test_requests_beyond_the_queue_get_resource_exhausted_and_the_server_serves_on
        assert result["codes"] and set(result["codes"]) <= {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}, result
        assert result["legit_after"]["code"] == "OK", result
        refused_as_unreadable = unreadable() - before
        assert 1 <= refused_as_unreadable <= 16, (refused_as_unreadable, result)  # the decoded ones, each counted
    growth = floods[-1]["rss_end_mb"] - start
    assert growth < 50, (start, floods)
    # nothing of the last flood is held until the next request: the batcher once kept its last batch's images in
    # its locals while it waited (settled RSS 47-96 MB above what it fell to after the next request). This was
    # tests/test_attacks_cost.py's flood test, on a deployment of its own (31 s); the third flood reads both figures
    last = floods[-1]
    assert last["rss_before_next_mb"] - last["rss_end_mb"] < 20, last
