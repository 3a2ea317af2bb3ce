"""The dispatcher's reliability core (:mod:`coordinator.scheduler`) as a pure state machine: events in, actions
out, no threads, sockets or clocks. Every expected sequence is worked out by hand from the rules in the module's
docstring; outputs are strings standing for the experts' tensors."""

from __future__ import annotations

import grpc
import pytest
from moevit.coordinator.scheduler import (
    Answered,
    CallScheduler,
    Cancel,
    ClearPenalty,
    Complete,
    DeadlinePassed,
    Failed,
    Fallback,
    HedgeTimerFired,
    Penalize,
    RanLocally,
    RunLocal,
    Send,
    SendFailed,
    Submitted,
)
from moevit.coordinator.sites import SiteError


def _sched(experts, replicas, down=(), deadline_s=10.0):
    return CallScheduler(7, experts, replicas, local_site="cam", is_up=lambda s: s not in down,
                         deadline_s=deadline_s)


def _err(site, code=grpc.StatusCode.UNAVAILABLE):
    return SiteError(site, f"{code.name}: boom", code)


def test_local_experts_run_in_process_and_remote_ones_go_one_call_per_site():
    # experts 0..3: 0 is held by the coordinator (local first), 1 and 3 on a, 2 on b then a
    s = _sched([0, 1, 2, 3], {0: ("cam", "a"), 1: ("a",), 2: ("b", "a"), 3: ("a",)})
    assert s.handle(Submitted()) == [Send(0, "a", (1, 3)), Send(1, "b", (2,)), RunLocal((0,))]
    assert s.handle(RanLocally(0, "y0")) == []
    assert s.handle(Answered(1, ["y2"])) == [ClearPenalty("b")]
    assert s.handle(Answered(0, ["y1", "y3"])) == [ClearPenalty("a"), Complete(["y0", "y1", "y2", "y3"])]
    assert s.finished and s.tally.as_dict() == {"calls": 2, "retries": 0, "hedges": 0, "hedge_wins": 0,
                                                "cancelled": 0}
    assert s.handle(Answered(0, ["late", "late"])) == []  # nothing after the end


def test_a_failed_call_is_penalised_and_its_items_retried_on_the_next_replica():
    s = _sched([4, 5], {4: ("a", "b"), 5: ("a", "c")})
    assert s.handle(Submitted()) == [Send(0, "a", (0, 1))]
    assert s.handle(Failed(0, _err("a"))) == [Penalize("a"), Send(1, "b", (0,)), Send(2, "c", (1,))]
    assert s.handle(Answered(2, ["y5"])) == [ClearPenalty("c")]
    assert s.handle(Answered(1, ["y4"])) == [ClearPenalty("b"), Complete(["y4", "y5"])]
    assert s.tally.calls == 3 and s.tally.retries == 1


def test_a_cancelled_call_is_not_penalised():
    s = _sched([4], {4: ("a", "b")})
    s.handle(Submitted())
    assert s.handle(Failed(0, _err("a", grpc.StatusCode.CANCELLED))) == [Send(1, "b", (0,))]


def test_a_site_known_down_is_skipped_and_no_replica_left_falls_back_with_the_last_error():
    s = _sched([1, 2], {1: ("a", "b"), 2: ("a",)}, down={"a"})
    assert s.handle(Submitted()) == [Send(0, "b", (0,))]  # expert 2 has no replica up: nothing sent
    failure = _err("b", grpc.StatusCode.INTERNAL)
    [penalty, end] = s.handle(Failed(0, failure))
    assert penalty == Penalize("b") and isinstance(end, Fallback)
    assert end.outputs == [None, None]
    assert end.errors[0] is failure  # the call's own error, not "unreachable"
    assert str(end.errors[1]) == "site a: UNAVAILABLE: no replica of expert 2 of layer 7 is reachable (health: down)"
    assert s.tally.retries == 1  # the failed call had an item to retry, even though no replica was left


def test_nothing_reachable_ends_at_once():
    s = _sched([3], {3: ("a",)}, down={"a"})
    [end] = s.handle(Submitted())
    assert isinstance(end, Fallback) and list(end.errors) == [0]
    assert end.errors[0].code == grpc.StatusCode.UNAVAILABLE and s.tally.calls == 0


def test_a_hedge_that_wins_cancels_and_penalises_the_slow_call():
    s = _sched([0, 1], {0: ("a", "b"), 1: ("a", "b")})
    assert s.handle(Submitted()) == [Send(0, "a", (0, 1))]
    assert s.handle(HedgeTimerFired()) == [Send(1, "b", (0, 1), hedge=True)]
    assert s.handle(HedgeTimerFired()) == []  # fires once
    assert s.handle(Answered(1, ["y0", "y1"])) == [ClearPenalty("b"), Cancel(0), Penalize("a"),
                                                   Complete(["y0", "y1"])]
    assert s.tally.as_dict() == {"calls": 2, "retries": 0, "hedges": 1, "hedge_wins": 1, "cancelled": 1}


def test_the_first_call_beating_its_hedge_cancels_the_hedge_without_penalty():
    s = _sched([0], {0: ("a", "b")})
    s.handle(Submitted())
    s.handle(HedgeTimerFired())
    assert s.handle(Answered(0, ["y0"])) == [ClearPenalty("a"), Cancel(1), Complete(["y0"])]
    assert s.tally.hedge_wins == 0 and s.tally.cancelled == 1


def test_a_hedge_covering_part_of_a_call_leaves_the_rest_of_it_running():
    # expert 1 has no second replica: only expert 0 is hedged; a's call still carries expert 1
    s = _sched([0, 1], {0: ("a", "b"), 1: ("a",)})
    s.handle(Submitted())
    assert s.handle(HedgeTimerFired()) == [Send(1, "b", (0,), hedge=True)]
    assert s.handle(Answered(1, ["y0"])) == [ClearPenalty("b")]  # a's call is not redundant: not cancelled
    assert s.handle(Answered(0, ["y0 from a", "y1"])) == [ClearPenalty("a"), Complete(["y0", "y1"])]  # first wins
    assert s.tally.hedge_wins == 1


def test_a_failure_while_a_hedge_covers_the_items_waits_for_the_hedge():
    s = _sched([0], {0: ("a", "b", "c")})
    s.handle(Submitted())
    s.handle(HedgeTimerFired())
    assert s.handle(Failed(0, _err("a"))) == [Penalize("a")]  # still covered by the hedge on b: no retry
    assert s.tally.retries == 0
    assert s.handle(Failed(1, _err("b"))) == [Penalize("b"), Send(2, "c", (0,))]
    assert s.handle(Answered(2, ["y0"])) == [ClearPenalty("c"), Complete(["y0"])]
    assert s.tally.as_dict() == {"calls": 3, "retries": 1, "hedges": 1, "hedge_wins": 0, "cancelled": 0}


def test_the_deadline_cancels_what_is_in_flight_and_fails_its_unanswered_items():
    s = _sched([0, 1, 2], {0: ("a",), 1: ("b",), 2: ("cam",)}, deadline_s=0.25)
    assert s.handle(Submitted()) == [Send(0, "a", (0,)), Send(1, "b", (1,)), RunLocal((2,))]
    s.handle(RanLocally(2, "y2"))
    s.handle(Answered(1, ["y1"]))
    [cancel, end] = s.handle(DeadlinePassed())
    assert cancel == Cancel(0) and isinstance(end, Fallback)
    assert end.outputs == [None, "y1", "y2"] and list(end.errors) == [0]
    assert str(end.errors[0]) == "site a: DEADLINE_EXCEEDED: no answer within the layer's 0.25 s deadline"
    assert s.tally.cancelled == 0  # deadline cancellations are not hedge losers


def test_a_call_that_cannot_start_goes_to_the_next_replica_uncounted():
    s = _sched([0], {0: ("a", "b")})
    assert s.handle(Submitted()) == [Send(0, "a", (0,))]
    assert s.handle(SendFailed(0, _err("a", grpc.StatusCode.CANCELLED))) == [Send(1, "b", (0,))]
    assert s.handle(Answered(1, ["y0"])) == [ClearPenalty("b"), Complete(["y0"])]
    assert s.tally.calls == 1 and s.tally.retries == 0


def test_the_run_ends_only_when_local_items_are_done():
    s = _sched([0, 1], {0: ("cam",), 1: ("a",)})
    s.handle(Submitted())
    assert s.handle(Answered(0, ["y1"])) == [ClearPenalty("a")]
    assert not s.finished
    assert s.handle(RanLocally(0, "y0")) == [Complete(["y0", "y1"])]


def test_an_answer_of_the_wrong_length_is_refused():
    s = _sched([0, 1], {0: ("a",), 1: ("a",)})
    s.handle(Submitted())
    with pytest.raises(ValueError, match="1 outputs for 2 items"):
        s.handle(Answered(0, ["y0"]))
