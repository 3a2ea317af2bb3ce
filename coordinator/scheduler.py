"""The reliability core of one MoE layer's expert calls, as a pure state machine: which replica each expert's
tokens go to, retries on the next replica, hedges, cancellation of calls made redundant, and health penalties.

:class:`CallScheduler` reads no clock, starts no thread and opens no socket: it is fed :data:`Event` values and
answers with :data:`Action` values; :class:`coordinator.dispatcher.RemoteDispatcher` is the driver that sends the
RPCs, waits on them, runs the timers and executes the actions in order. The rules:

- *Replica choice*: an expert held on the coordinator's own site is computed in-process (:class:`RunLocal`);
  any other goes to the first of its replicas, in the placement's order, that is up and not yet tried for it.
  The items going to one site are sent in one call (:class:`Send`).
- *Retry*: a failed call (:class:`Failed`) penalises its site (unless it was cancelled) and sends its items not
  yet answered, and not covered by another call in flight, to their next replica; one retry is counted per failed
  call that had such items. A call that could not even start (:class:`SendFailed`) is re-sent the same way, with
  no penalty and no retry counted.
- *Hedging*: when the hedge timer fires (:class:`HedgeTimerFired`, once), items still unanswered but covered by a
  call are also sent to their next replica.
- *First answer wins* (:class:`Answered`): an answer clears its site's penalty count and fills the items no
  earlier answer filled; every other call whose items are now all answered is cancelled (:class:`Cancel`); a
  cancelled call that was not a hedge, beaten by a hedge, penalises its site (it was slower than the hedge delay).
- *Deadline* (:class:`DeadlinePassed`): calls still in flight are cancelled and their unanswered items fail with
  ``DEADLINE_EXCEEDED``.
- *End*: once no call is in flight and no local item is pending, :class:`Complete` (every item answered) or
  :class:`Fallback` (the items no replica answered, each with the last error seen for it, or "no replica
  reachable"); both are the last action.

Outputs are opaque to the scheduler (tensors in the dispatcher, strings in the tests).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from moevit.coordinator.sites import SiteError

# --------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Submitted:
    """The layer's items were handed over: first sends and local computations."""


@dataclass(frozen=True)
class Answered:
    """Call ``attempt`` answered with ``outputs``, one per position of its :class:`Send`, in that order."""

    attempt: int
    outputs: Sequence[Any]


@dataclass(frozen=True)
class Failed:
    """Call ``attempt`` ended without a usable answer."""

    attempt: int
    error: SiteError


@dataclass(frozen=True)
class SendFailed:
    """Call ``attempt`` could not be started at all (the client is closed)."""

    attempt: int
    error: SiteError


@dataclass(frozen=True)
class RanLocally:
    """Item ``position`` was computed in-process."""

    position: int
    output: Any


@dataclass(frozen=True)
class HedgeTimerFired:
    """The hedging delay has passed since the items were submitted."""


@dataclass(frozen=True)
class DeadlinePassed:
    """The layer's deadline has passed."""


Event = Submitted | Answered | Failed | SendFailed | RanLocally | HedgeTimerFired | DeadlinePassed

# -------------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Start call ``attempt``: the items at ``positions`` (their experts' tokens) to ``site``."""

    attempt: int
    site: str
    positions: tuple[int, ...]
    hedge: bool = False


@dataclass(frozen=True)
class RunLocal:
    """Compute the items at ``positions`` in-process (answer each with :class:`RanLocally`)."""

    positions: tuple[int, ...]


@dataclass(frozen=True)
class Cancel:
    """Abandon call ``attempt`` (its answer, if one still comes, is ignored)."""

    attempt: int


@dataclass(frozen=True)
class Penalize:
    """``site`` failed a call or lost to a hedge: route around it for a while (its health watch's penalty)."""

    site: str


@dataclass(frozen=True)
class ClearPenalty:
    """``site`` answered: its run of failures is over."""

    site: str


@dataclass(frozen=True)
class Complete:
    """Every item has its output (in item order)."""

    outputs: list[Any]


@dataclass(frozen=True)
class Fallback:
    """Items no replica answered: ``errors`` (position -> why) and the outputs of the others (None for those)."""

    outputs: list[Any]
    errors: dict[int, SiteError]


Action = Send | RunLocal | Cancel | Penalize | ClearPenalty | Complete | Fallback


@dataclass
class Tally:
    """What one run did, for :class:`coordinator.dispatcher.DispatchCounters`."""

    calls: int = 0
    retries: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    cancelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "retries": self.retries, "hedges": self.hedges, "hedge_wins": self.hedge_wins,
                "cancelled": self.cancelled}


@dataclass
class _Call:
    site: str
    positions: tuple[int, ...]
    hedge: bool


@dataclass
class _Item:
    expert: int
    tried: set[str] = field(default_factory=set)
    covering: int = 0  # calls in flight that carry this item
    answered: bool = False
    output: Any = None
    error: SiteError | None = None


class CallScheduler:
    """The calls of one layer's ``experts`` (one item per entry, in order), over ``replicas`` (expert -> sites in
    order of preference; the coordinator's own site, ``local_site``, means in-process). ``is_up(site)`` says
    whether a site is up now (read when a replica is chosen). ``deadline_s`` only words the deadline error.

    Feed events with :meth:`handle`; it returns the actions to execute, in order. Execute each action before
    feeding the next event (a penalty must be in force before the next replica choice)."""

    def __init__(self, layer_id: int, experts: Sequence[int], replicas: Mapping[int, Sequence[str]], *,
                 local_site: str, is_up: Callable[[str], bool], deadline_s: float) -> None:
        self.layer_id, self.local_site, self.is_up, self.deadline_s = layer_id, local_site, is_up, deadline_s
        self.replicas = {e: tuple(sites) for e, sites in replicas.items()}
        self.items = [_Item(int(e)) for e in experts]
        self.inflight: dict[int, _Call] = {}
        self.local_pending: set[int] = set()
        self.tally = Tally()
        self.finished = False
        self._next_attempt = 0
        self._started = False
        self._hedged = False

    # ------------------------------------------------------------------------------------------ events

    def handle(self, event: Event) -> list[Action]:
        """The actions ``event`` calls for; nothing once the run has ended (late answers are ignored)."""
        if self.finished:
            return []
        out: list[Action] = []
        if isinstance(event, Submitted):
            self._submit(out)
        elif isinstance(event, Answered):
            self._answered(event, out)
        elif isinstance(event, Failed):
            self._failed(event, out)
        elif isinstance(event, SendFailed):
            self._send_failed(event, out)
        elif isinstance(event, RanLocally):
            self._ran_locally(event)
        elif isinstance(event, HedgeTimerFired):
            self._hedge(out)
        elif isinstance(event, DeadlinePassed):
            self._deadline(out)
        else:
            raise TypeError(f"not a scheduler event: {event!r}")
        if self._started and not self.inflight and not self.local_pending:
            self.finished = True
            out.append(self._end())
        return out

    def _submit(self, out: list[Action]) -> None:
        if self._started:
            return
        self._started = True
        local = [i for i, it in enumerate(self.items) if self.local_site in self.replicas.get(it.expert, ())]
        self._launch([i for i, it in enumerate(self.items) if self.local_site not in self.replicas.get(it.expert, ())],
                     out)
        if local:  # after the sends: local experts overlap the calls in flight
            self.local_pending.update(local)
            out.append(RunLocal(tuple(local)))

    def _answered(self, ev: Answered, out: list[Action]) -> None:
        call = self.inflight.pop(ev.attempt, None)
        if call is None:  # cancelled meanwhile
            return
        if len(ev.outputs) != len(call.positions):
            raise ValueError(f"attempt {ev.attempt}: {len(ev.outputs)} outputs for {len(call.positions)} items")
        for i in call.positions:
            self.items[i].covering -= 1
        out.append(ClearPenalty(call.site))
        won = False
        for i, y in zip(call.positions, ev.outputs, strict=True):
            it = self.items[i]
            if not it.answered:
                it.answered, it.output = True, y
                won = True
        if call.hedge and won:
            self.tally.hedge_wins += 1
        for attempt, other in list(self.inflight.items()):  # calls made redundant (hedge losers): cancel
            if all(self.items[i].answered for i in other.positions):
                del self.inflight[attempt]
                for i in other.positions:
                    self.items[i].covering -= 1
                self.tally.cancelled += 1
                out.append(Cancel(attempt))
                if call.hedge and not other.hedge:
                    out.append(Penalize(other.site))  # slower than the hedge delay: route around it for a while

    def _failed(self, ev: Failed, out: list[Action]) -> None:
        call = self.inflight.pop(ev.attempt, None)
        if call is None:
            return
        for i in call.positions:
            self.items[i].covering -= 1
        if ev.error.code != grpc.StatusCode.CANCELLED:
            out.append(Penalize(call.site))
        again = []
        for i in call.positions:
            it = self.items[i]
            if not it.answered:
                it.error = ev.error
                if it.covering == 0:
                    again.append(i)
        if again:
            self.tally.retries += 1
            self._launch(again, out)

    def _send_failed(self, ev: SendFailed, out: list[Action]) -> None:
        call = self.inflight.pop(ev.attempt, None)
        if call is None:
            return
        self.tally.calls -= 1  # never started: not a call
        self.tally.hedges -= int(call.hedge)
        for i in call.positions:
            self.items[i].covering -= 1
            self.items[i].error = ev.error
        self._launch(list(call.positions), out)

    def _ran_locally(self, ev: RanLocally) -> None:
        if ev.position in self.local_pending:
            self.local_pending.discard(ev.position)
            it = self.items[ev.position]
            it.answered, it.output = True, ev.output

    def _hedge(self, out: list[Action]) -> None:
        if self._hedged:
            return
        self._hedged = True
        slow = [i for i, it in enumerate(self.items) if not it.answered and it.covering > 0]
        if slow:
            self._launch(slow, out, hedge=True)

    def _deadline(self, out: list[Action]) -> None:
        for attempt, call in self.inflight.items():
            out.append(Cancel(attempt))
            for i in call.positions:
                it = self.items[i]
                it.covering -= 1
                if not it.answered:
                    it.error = SiteError(call.site, f"DEADLINE_EXCEEDED: no answer within the layer's "
                                         f"{self.deadline_s:g} s deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
        self.inflight.clear()

    # ------------------------------------------------------------------------------------------ helpers

    def _next_replica(self, it: _Item) -> str | None:
        for site in self.replicas.get(it.expert, ()):
            if site != self.local_site and site not in it.tried and self.is_up(site):
                return site
        return None

    def _unreachable(self, it: _Item) -> SiteError:
        sites = [s for s in self.replicas.get(it.expert, ()) if s != self.local_site]
        down = ", ".join(sites) or "(none)"
        return SiteError(down, f"UNAVAILABLE: no replica of expert {it.expert} of layer {self.layer_id} is reachable"
                         + (" (tried and failed)" if it.tried else " (health: down)"), grpc.StatusCode.UNAVAILABLE)

    def _launch(self, positions: list[int], out: list[Action], *, hedge: bool = False) -> None:
        """Send each item at ``positions`` to its next replica, one call per site; an item with none left keeps
        its last error (or gets "unreachable" when nothing else covers it)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i in positions:
            it = self.items[i]
            site = self._next_replica(it)
            if site is None:
                if it.covering == 0 and it.error is None:
                    it.error = self._unreachable(it)
                continue
            it.tried.add(site)
            groups[site].append(i)
        for site, ps in groups.items():
            attempt = self._next_attempt
            self._next_attempt += 1
            self.inflight[attempt] = _Call(site, tuple(ps), hedge)
            for i in ps:
                self.items[i].covering += 1
            self.tally.calls += 1
            self.tally.hedges += int(hedge)
            out.append(Send(attempt, site, tuple(ps), hedge))

    def _end(self) -> Complete | Fallback:
        outputs = [it.output for it in self.items]
        errors = {i: it.error or self._unreachable(it) for i, it in enumerate(self.items) if not it.answered}
        return Fallback(outputs, errors) if errors else Complete(outputs)


__all__ = ["Action", "Answered", "CallScheduler", "Cancel", "ClearPenalty", "Complete", "DeadlinePassed", "Event",
           "Failed", "Fallback", "HedgeTimerFired", "Penalize", "RanLocally", "RunLocal", "Send", "SendFailed",
           "Submitted", "Tally"]
