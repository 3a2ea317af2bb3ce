"""The soak (``moevit.sim.soak``, run by ``bench/soak.py``) in short (issue 8): a few hundred Classify requests
through three replicated worker processes behind link proxies while a worker is killed and restarted, a link is
reset and a link stalls.
The figures of the full run are in bench/results/soak.json; here the promises behind them are checked."""

from __future__ import annotations

import random

import pytest
from moevit.sim.soak import KINDS, SoakConfig, draw_fault, pooled_slope, request_bound_s, run_soak


def test_the_fault_schedule_is_seeded():
    cfg = SoakConfig()

    def schedule(seed: int) -> list[tuple[str, str, float, float]]:
        rng = random.Random(seed)
        return [(f.kind, f.worker, f.planned_s, gap) for f, gap in (draw_fault(rng, cfg) for _ in range(20))]

    assert schedule(3) == schedule(3)
    assert schedule(3) != schedule(4)
    assert {k for k, *_ in schedule(3)} <= set(KINDS)
    assert all(cfg.gap_s[0] <= gap <= cfg.gap_s[1] for *_, gap in schedule(3))


def test_pooled_slope_ignores_the_jump_of_a_restart():
    # two incarnations growing 1 MB/min each, the second starting 200 MB lower, and a gap with no process (-1)
    t = [float(i) for i in range(0, 120)]
    groups = [1 if ti < 50 else (-1 if ti < 60 else 2) for ti in t]
    base = {1: 100.0, -1: float("nan"), 2: -100.0}
    y = [base[g] + ti / 60 for ti, g in zip(t, groups, strict=True)]
    assert pooled_slope(t, y, groups, 0.0) == pytest.approx(1.0)
    assert pooled_slope(t, y, groups, 0.0, {2: 200.0}) == pytest.approx(1.0)  # group 2 left out
    assert pooled_slope(t[:3], y[:3], groups[:3], 0.0) is None


@pytest.mark.slow
def test_short_soak_under_kill_reset_and_stall(tmp_path):
    """Seed 1 draws kill, reset, stall first. ~300 requests (more if the three faults have not ended by then):
    no request hangs, none fails (every expert keeps a live replica), every answer not marked degraded equals
    the fault-free one, answers and throughput are back within 5 s of the kill, the coordinator's memory does
    not run away. The killed worker is restarted 2 s later: its start-up (seconds of imports) competes for the
    two cores with everything else, which is the machine's recovery, not the coordinator's."""
    cfg = SoakConfig(requests=300, clients=3, seed=1, images=16, baseline_s=3.0, gap_s=(0.5, 1.0),
                     kill_down_s=(2.0, 2.0), link_down_s=(1.0, 1.5), min_faults=3, tail_s=2.0, rss_interval_s=0.25)
    res = run_soak(cfg, tmp_path, log=lambda _: None)
    s = res.summary
    c = s["counts"]
    kinds = [f["kind"] for f in s["faults"]]
    assert kinds[:3] == ["kill", "reset", "stall"], kinds
    assert all(f["error"] is None for f in s["faults"]), s["faults"]

    assert c["total"] >= 300 and c["unfinished"] == 0
    # each request ended within the bound its deadlines give it (one deadline per MoE layer per forward ahead)
    assert res.bound_s == request_bound_s(cfg, 3)
    assert s["over_bound"] == 0, s["latency_ms"]["all"]
    assert c["failed"] == 0, c["failed_by_kind"]
    assert c["ok"] > 0 and c["mismatched"] == 0, s["ok_max_prob_diff"]

    kill = s["faults"][0]
    assert kill["restart_wall_s"] is not None and kill["rejoined_after_s"] is not None
    assert kill["first_ok_s"] is not None and kill["first_ok_s"] < 10.0, kill
    # how fast throughput comes back is a benchmark figure (bench/soak.py), too noisy on a shared machine to assert
    for f in s["faults"]:
        assert f["first_ok_s"] is not None and f["first_ok_s"] < 10.0, f

    rss = s["rss"]
    slope = rss["slope_mb_per_min_second_half"]["coordinator"]
    if slope is None:
        slope = rss["slope_mb_per_min_whole_run"]["coordinator"]
    assert slope is not None and slope < 60.0, rss["coordinator_mb_start_end"]  # a 1 GB/20 min leak would show
    assert all(ys[-1] is not None for ys in rss["workers_mb"].values())  # every worker is back at the end
