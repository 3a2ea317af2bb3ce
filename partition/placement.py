"""The partitioner: which site holds each expert, within memory caps, minimising one cost-model objective.

Every expert of every MoE layer goes to exactly one site (its primary copy); optionally the hottest background
experts then get a second copy on the coordinator's site (:func:`add_replicas`), each only when it fits and lowers
the objective. With the ``split`` replica policy such a copy shares the expert's load with the remote one; with
``local-first`` (what ``moe-coordinator`` does) the coordinator's copy serves all of it, so a copy only pays where
that beats the primary placement, and the remote copy stays as a standby. Costs come from
:mod:`partition.costmodel` and nothing else, so the figures printed here are the ones the coordinator and the
simulator see.

Solvers:

* **MILP** (``scipy.optimize.milp``, HiGHS), exact for the cost model: binary ``x[i, s]`` (expert i on site s),
  one site per expert, memory ``sum_i bytes_i x[i, s] <= free_s``. Energy and bytes are linear in x. Latency is
  ``trunk + sum over layers l and class scenarios c of prior_c * T[l, c]`` with ``T[l, c] >= contact_s * u[l, s]
  + sum_{i in l} load_c[i] * patch_time[l, s] * x[i, s]`` for every site s (the per-layer max over sites,
  linearised), and ``u[l, s] >= x[i, s]`` for every loaded expert i of layer l (site s is contacted in layer l).
  ``u`` may be continuous: it is bounded below by binaries and only costs, so it settles at 0 or 1. The valid cut
  ``T[l, c] >= sum_s x[i, s] * (load_c[i] * patch_time[l, s] + contact_s)`` per loaded expert i tightens the LP
  relaxation, which otherwise spreads a hot expert fractionally over every site.
* **Heuristic**, for instances the MILP does not finish within its time limit: greedy insertion (experts by
  falling load, each to the site that raises the objective least, within memory), then local search (move one
  expert; swap two), then a fixed number of seeded perturb-and-search rounds. No clock decides anything in it,
  so the same inputs give the same placement.

``method="auto"`` runs both (the MILP only up to :data:`MILP_MAX_BINARIES` binaries) and keeps the better; a MILP
cut short by its time limit can depend on machine speed, a proven optimum or the heuristic does not.

Baselines printed beside the chosen placement: ``round-robin`` (the topology's default placement: expert e on the
(e mod n)-th site by name), ``random`` (seeded, each expert to a random site with room) and
``all-on-coordinator`` (infeasible when the coordinator's memory cannot hold every expert).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from moevit.deploy.topology import Placement, Topology, default_placement
from moevit.partition.costmodel import (
    MB,
    OBJECTIVES,
    REPLICA_POLICIES,
    SCENARIOS,
    CostCoefficients,
    ImageCost,
    Stats,
    check_offwire,
    coefficients,
    evaluate_placement,
    objective_value,
    parse_weights,
)
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from moevit.offwire import skip_layers

__all__ = [
    "MILP_MAX_BINARIES",
    "METHODS",
    "Baseline",
    "PlacementResult",
    "Problem",
    "add_replicas",
    "all_on_coordinator",
    "background_experts",
    "check_memory",
    "format_report",
    "heuristic_assignment",
    "milp_assignment",
    "place",
    "random_placement",
    "round_robin",
    "skip_fractions",
]

METHODS = ("auto", "milp", "heuristic")
# Above this many binaries "auto" skips the MILP: presolve alone would eat the time limit.
MILP_MAX_BINARIES = 40_000
_TOL = 1e-12


def _weights_for(objective: str, weights: Mapping[str, float] | str | None) -> dict[str, float]:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "weighted":
        return parse_weights(weights)
    if weights is not None:
        raise ValueError(f"weights apply only to the 'weighted' objective, not {objective!r}")
    # The bytes objective is in bytes; the weighted one counts megabytes.
    return {"latency": 0.0, "energy": 0.0, "bytes": 0.0, objective: float(MB) if objective == "bytes" else 1.0}


# ============================================================================================ the problem


@dataclass(eq=False)
class Problem:
    """One placement instance as arrays: items are (layer, expert) pairs in stats order, sites sorted by name.

    ``value(a)`` is the objective of the single-copy assignment ``a`` (site position per item); it equals
    ``objective_value(evaluate_placement(...))`` of the same placement (a test holds them to it).
    """

    topology: Topology
    stats: Stats
    coef: CostCoefficients
    objective: str
    weights: dict[str, float]
    scenarios: str
    item_layer: np.ndarray  # [I] layer position
    item_expert: np.ndarray  # [I] expert index within its layer
    weight: np.ndarray  # [I] bytes
    load: np.ndarray  # [I] mean patches per image
    class_load: np.ndarray  # [I, C]
    prior: np.ndarray  # [C]
    lin: np.ndarray  # [I, S] linear objective terms
    allowed: np.ndarray  # [I, S]
    free: np.ndarray  # [S] bytes for expert weights (inf: unbounded)
    w_lat: float
    const: float
    pt: np.ndarray = field(init=False)  # [L, S] per-patch time (0 where unreachable)
    contact: np.ndarray = field(init=False)  # [S]

    @classmethod
    def build(cls, topology: Topology, stats: Stats, *, objective: str = "latency",
              weights: Mapping[str, float] | str | None = None, wire_bytes: int = 2,
              scenarios: str = "class", coef: CostCoefficients | None = None,
              offwire: Sequence[np.ndarray] | None = None) -> Problem:
        """``offwire`` (per MoE layer, the share [E] of each expert's patches a skip rule keeps off the wire, as
        :func:`skip_fractions` gives): those patches are left out of the loads, as their cost does not depend on
        where their expert is (none when dropped; the coordinator's when computed there by a local copy)."""
        if scenarios not in SCENARIOS:
            raise ValueError(f"scenarios must be one of {SCENARIOS}, got {scenarios!r}")
        w = _weights_for(objective, weights)
        coef = coef if coef is not None else coefficients(topology, stats, wire_bytes=wire_bytes)
        kept = [np.ones(ls.num_experts) for ls in stats.layers] if offwire is None else \
            [1.0 - f for f in check_offwire(stats, offwire)]
        layer_pos, expert, wt, load, cls_load = [], [], [], [], []
        for li, ls in enumerate(stats.layers):
            for e in range(ls.num_experts):
                layer_pos.append(li)
                expert.append(e)
                wt.append(ls.expert_weight_bytes)
                load.append(ls.load_mean[e] * kept[li][e])
                cls_load.append(ls.class_load[:, e] * kept[li][e] if scenarios == "class" else
                                [ls.load_mean[e] * kept[li][e]])
        item_layer = np.array(layer_pos, dtype=np.int64)
        load_a = np.array(load, dtype=np.float64)
        S = len(coef.sites)
        remote = np.arange(S) != coef.coordinator
        per_patch = (w["energy"] * coef.patch_energy_j
                     + w["bytes"] * 2 * coef.patch_bytes[:, None] * remote[None, :] / MB)  # [L, S]
        lin = load_a[:, None] * np.nan_to_num(per_patch[item_layer], posinf=0.0)
        weight = np.array(wt, dtype=np.float64)
        allowed = coef.reachable[None, :] & (weight[:, None] <= coef.free_bytes[None, :] + 1e-9)
        prior = stats.class_prior if scenarios == "class" else np.ones(1)
        p = cls(topology=topology, stats=stats, coef=coef, objective=objective, weights=w, scenarios=scenarios,
                item_layer=item_layer, item_expert=np.array(expert, dtype=np.int64), weight=weight, load=load_a,
                class_load=np.array(cls_load, dtype=np.float64), prior=prior, lin=lin, allowed=allowed,
                free=coef.free_bytes.copy(), w_lat=w["latency"],
                const=w["latency"] * coef.trunk_s + w["energy"] * coef.trunk_j)
        return p

    def __post_init__(self) -> None:
        self.pt = np.where(self.coef.reachable[None, :], self.coef.patch_time_s, 0.0)
        self.contact = np.where(self.coef.reachable, self.coef.contact_s, 0.0)

    @property
    def num_items(self) -> int:
        return len(self.item_layer)

    @property
    def num_sites(self) -> int:
        return len(self.coef.sites)

    def layer_value(self, li: int, loads_cs: np.ndarray, contacted: np.ndarray) -> float:
        """Expected latency of layer position ``li`` given site loads [C, S] and contacted sites [S]."""
        times = self.contact[None, :] * contacted[None, :] + loads_cs * self.pt[li][None, :]
        return float(self.prior @ times.max(axis=1))

    def value(self, a: np.ndarray) -> float:
        total = self.const + float(self.lin[np.arange(self.num_items), a].sum())
        if self.w_lat:
            for li in range(len(self.stats.layers)):
                idx = np.flatnonzero(self.item_layer == li)
                loads = np.zeros((len(self.prior), self.num_sites))
                np.add.at(loads.T, a[idx], self.class_load[idx])
                contacted = np.zeros(self.num_sites, dtype=bool)
                contacted[a[idx][self.load[idx] > 0]] = True
                total += self.w_lat * self.layer_value(li, loads, contacted)
        return total

    def memory_ok(self, a: np.ndarray) -> bool:
        used = np.bincount(a, weights=self.weight, minlength=self.num_sites)
        return bool(np.all(used <= self.free + 1e-6) and np.all(self.allowed[np.arange(self.num_items), a]))

    def to_placement(self, a: np.ndarray, fingerprint: str | None = None) -> Placement:
        layers = [ls.layer for ls in self.stats.layers]
        return Placement({(layers[li], int(e)): (self.coef.sites[int(s)],)
                          for li, e, s in zip(self.item_layer, self.item_expert, a, strict=True)},
                         fingerprint=fingerprint)


# ============================================================================================ memory checks


def check_memory(topology: Topology, stats: Stats, coef: CostCoefficients) -> None:
    """Refuse, with the totals, a topology whose memory cannot hold the model in any placement."""
    c = coef.sites[coef.coordinator]
    cap_c = coef.cap_bytes[coef.coordinator]
    if coef.fixed_bytes[coef.coordinator] > cap_c:
        what = "trunk, buffer and (fallback: local) every expert" if coef.coordinator_holds_all else "trunk and buffer"
        raise ValueError(
            f"{topology.path}: sites.{c}.device.memory_mb: the coordinator needs "
            f"{coef.fixed_bytes[coef.coordinator] / MB:.2f} MB for the {what}, has {cap_c / MB:.2f} MB")
    if coef.coordinator_holds_all:
        return
    need = stats.expert_bytes_total
    usable = np.where(coef.reachable, np.maximum(coef.free_bytes, 0.0), 0.0)
    have = float(usable.sum())
    if need > have + 1e-6:
        raise ValueError(
            f"{topology.path}: not enough memory for any placement: the experts need {need / MB:.2f} MB in total "
            f"(one copy each, {sum(ls.num_experts for ls in stats.layers)} experts), the sites have "
            f"{have / MB:.2f} MB for experts ({sum(coef.cap_bytes) / MB:.2f} MB in all, less "
            f"{coef.fixed_bytes[coef.coordinator] / MB:.2f} MB trunk + buffer on the coordinator and "
            f"{coef.buffer_bytes / MB:.2f} MB buffer on each other site)")
    biggest = max(ls.expert_weight_bytes for ls in stats.layers)
    if biggest > usable.max() + 1e-6:
        raise ValueError(
            f"{topology.path}: no site has room for one expert of {biggest / MB:.3f} MB "
            f"(largest free memory {usable.max() / MB:.3f} MB)")


# ============================================================================================ MILP


@dataclass(frozen=True)
class MilpOutcome:
    assignment: np.ndarray | None
    status: str  # "optimal", "time limit", "infeasible", "skipped (...)", "failed: ..."
    value: float | None
    bound: float | None
    seconds: float


def milp_assignment(problem: Problem, *, time_limit: float = 10.0) -> MilpOutcome:
    """Solve ``problem`` exactly with HiGHS (see the module docstring for the formulation)."""
    t0 = time.perf_counter()
    n_items, S = problem.num_items, problem.num_sites
    L, C = len(problem.stats.layers), len(problem.prior)
    nx = n_items * S
    with_lat = problem.w_lat > 0
    nu = L * S if with_lat else 0
    nt = L * C if with_lat else 0
    n = nx + nu + nt
    xi = lambda i, j: i * S + j
    ui = lambda li, j: nx + li * S + j
    ti = lambda li, c: nx + nu + li * C + c
    # Time in the latency rows is in milliseconds: coefficients near 1 keep HiGHS's tolerances meaningful.
    k = 1e3
    cost = np.zeros(n)
    cost[:nx] = problem.lin.reshape(-1)
    lb = np.zeros(n)
    ub = np.ones(n)
    ub[:nx] = problem.allowed.reshape(-1).astype(float)
    integrality = np.zeros(n)
    integrality[:nx] = 1
    if with_lat:
        for li in range(L):
            for c in range(C):
                cost[ti(li, c)] = problem.w_lat * problem.prior[c] / k
                ub[ti(li, c)] = np.inf
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    r = 0
    for i in range(n_items):  # one site per expert
        for j in range(S):
            rows.append(r)
            cols.append(xi(i, j))
            vals.append(1.0)
        lo.append(1.0)
        hi.append(1.0)
        r += 1
    for j in range(S):  # memory
        if not math.isfinite(problem.free[j]):
            continue
        for i in range(n_items):
            rows.append(r)
            cols.append(xi(i, j))
            vals.append(problem.weight[i] / MB)
        lo.append(-np.inf)
        hi.append(problem.free[j] / MB + 1e-9)
        r += 1
    if with_lat:
        for li in range(L):
            items = np.flatnonzero(problem.item_layer == li)
            for j in range(S):
                if not problem.allowed[items, j].any():
                    continue
                if problem.contact[j] > 0:
                    for i in items:
                        if problem.load[i] > 0 and problem.allowed[i, j]:
                            rows += [r, r]
                            cols += [xi(i, j), ui(li, j)]
                            vals += [1.0, -1.0]
                            lo.append(-np.inf)
                            hi.append(0.0)
                            r += 1
                for c in range(C):
                    for i in items:
                        coef = problem.class_load[i, c] * problem.pt[li, j] * k
                        if coef > 0 and problem.allowed[i, j]:
                            rows.append(r)
                            cols.append(xi(i, j))
                            vals.append(coef)
                    if problem.contact[j] > 0:
                        rows.append(r)
                        cols.append(ui(li, j))
                        vals.append(problem.contact[j] * k)
                    rows.append(r)
                    cols.append(ti(li, c))
                    vals.append(-1.0)
                    lo.append(-np.inf)
                    hi.append(0.0)
                    r += 1
            # Valid cuts that tighten the LP relaxation (fractional x otherwise spreads a hot expert over every
            # site): the site holding expert i is busy at least for i alone, T[l, c] >= sum_s x[i, s] * (load_c[i]
            # * patch_time[l, s] + contact_s), for loaded experts.
            for i in items:
                if problem.load[i] <= 0:
                    continue
                for c in range(C):
                    for j in range(S):
                        if problem.allowed[i, j]:
                            coef = (problem.class_load[i, c] * problem.pt[li, j] + problem.contact[j]) * k
                            if coef > 0:
                                rows.append(r)
                                cols.append(xi(i, j))
                                vals.append(coef)
                    rows.append(r)
                    cols.append(ti(li, c))
                    vals.append(-1.0)
                    lo.append(-np.inf)
                    hi.append(0.0)
                    r += 1
    A = sparse.csr_array((vals, (rows, cols)), shape=(r, n))
    res = milp(cost, integrality=integrality, bounds=Bounds(lb, ub), constraints=LinearConstraint(A, lo, hi),
               options={"time_limit": max(0.1, float(time_limit)), "disp": False, "mip_rel_gap": 1e-4})
    seconds = time.perf_counter() - t0
    bound = getattr(res, "mip_dual_bound", None)
    bound = None if bound is None or not np.isfinite(bound) else float(bound) + problem.const
    if res.x is None:
        status = "infeasible" if res.status == 2 else ("time limit" if res.status == 1 else f"failed: {res.message}")
        return MilpOutcome(None, status, None, bound, seconds)
    a = res.x[:nx].reshape(n_items, S).argmax(axis=1).astype(np.int64)
    status = "optimal" if res.status == 0 else "time limit"
    if not problem.memory_ok(a):  # numerical slack in a memory row: never hand back an overfull site
        return MilpOutcome(None, "failed: solution violates memory by rounding", None, bound, seconds)
    return MilpOutcome(a, status, problem.value(a), bound, seconds)


# ============================================================================================ heuristic


def _top3(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of times [C, S]: the indices and values of the three largest columns, padded with -1 / -inf."""
    C, S = times.shape
    order = np.argsort(-times, axis=1, kind="stable")[:, :3]
    vals = times[np.arange(C)[:, None], order]
    if S < 3:
        order = np.concatenate([order, np.full((C, 3 - S), -1)], axis=1)
        vals = np.concatenate([vals, np.full((C, 3 - S), -np.inf)], axis=1)
    return order, vals


class _Search:
    """Incremental state of a single-copy assignment, for greedy insertion and local search."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        L, C, S = len(p.stats.layers), len(p.prior), p.num_sites
        self.a = np.full(p.num_items, -1, dtype=np.int64)
        self.loads = np.zeros((L, C, S))
        self.contacts = np.zeros((L, S), dtype=np.int64)  # loaded experts of layer l on site s
        self.used = np.zeros(S)
        self.layer_val = np.zeros(L)
        if p.w_lat:
            for li in range(L):
                self.layer_val[li] = p.layer_value(li, self.loads[li], self.contacts[li] > 0)
        self.lin_sum = 0.0

    @classmethod
    def start(cls, p: Problem, a: np.ndarray) -> _Search:
        s = cls(p)
        for i in range(len(a)):
            s._apply(i, int(a[i]))
        return s

    @property
    def value(self) -> float:
        return self.p.const + self.lin_sum + self.p.w_lat * float(self.layer_val.sum())

    def _room(self, i: int) -> np.ndarray:
        p = self.p
        return p.allowed[i] & (self.used + p.weight[i] <= p.free + 1e-6)

    def move_deltas(self, i: int, *, room: bool = True) -> np.ndarray:
        """Objective change of putting item i on each site (from its current site, or from nowhere); inf where it
        is not allowed (or, with ``room``, does not fit). The current site gets 0."""
        p = self.p
        j1 = int(self.a[i])
        li = int(p.item_layer[i])
        ok = self._room(i) if room else p.allowed[i].copy()
        if j1 >= 0:
            ok[j1] = True
        delta = p.lin[i] - (p.lin[i, j1] if j1 >= 0 else 0.0)
        if p.w_lat:
            loads = self.loads[li].copy()
            cnt = self.contacts[li].copy()
            loaded = p.load[i] > 0
            if j1 >= 0:
                loads[:, j1] -= p.class_load[i]
                cnt[j1] -= int(loaded)
            part = cnt > 0
            times = p.contact[None, :] * part[None, :] + loads * p.pt[li][None, :]  # [C, S]
            S = p.num_sites
            # The max over the other sites, for every candidate site at once: the best or, where the candidate
            # is the best, the second best.
            order, vals = _top3(times)
            excl = np.where(order[:, :1] == np.arange(S)[None, :], vals[:, 1:2], vals[:, :1])
            add_contact = p.contact * (~part if loaded else np.zeros(S, dtype=bool))
            newrow = times + np.outer(p.class_load[i], p.pt[li]) + add_contact[None, :]
            newval = p.prior @ np.maximum(excl, newrow)  # [S]
            delta = delta + p.w_lat * (newval - self.layer_val[li])
        delta = np.where(ok, delta, np.inf)
        if j1 >= 0:
            delta[j1] = 0.0
        return delta

    def _apply(self, i: int, j2: int) -> None:
        p = self.p
        j1 = int(self.a[i])
        li = int(p.item_layer[i])
        loaded = int(p.load[i] > 0)
        if j1 >= 0:
            self.loads[li][:, j1] -= p.class_load[i]
            self.contacts[li, j1] -= loaded
            self.used[j1] -= p.weight[i]
            self.lin_sum -= p.lin[i, j1]
        self.loads[li][:, j2] += p.class_load[i]
        self.contacts[li, j2] += loaded
        self.used[j2] += p.weight[i]
        self.lin_sum += p.lin[i, j2]
        self.a[i] = j2
        if p.w_lat:
            self.layer_val[li] = p.layer_value(li, self.loads[li], self.contacts[li] > 0)

    def greedy(self, order: np.ndarray) -> bool:
        for i in order:
            d = self.move_deltas(int(i))
            j = int(np.argmin(d))
            if not np.isfinite(d[j]):
                return False
            self._apply(int(i), j)
        return True

    def same_layer_swaps(self, i1: int, items: np.ndarray) -> np.ndarray:
        """Objective change of exchanging the sites of item i1 and each of ``items`` (all of i1's layer); inf
        where that is no swap (same site) or not allowed. Experts of one layer weigh the same: memory holds."""
        p = self.p
        j1 = int(self.a[i1])
        j2 = self.a[items]
        ok = (j2 != j1) & p.allowed[items, j1] & p.allowed[i1, j2]
        gains = p.lin[i1, j2] + p.lin[items, j1] - p.lin[i1, j1] - p.lin[items, j2]
        if p.w_lat:
            li = int(p.item_layer[i1])
            loads, cnt = self.loads[li], self.contacts[li]
            times = p.contact[None, :] * (cnt > 0)[None, :] + loads * p.pt[li][None, :]  # [C, S]
            order, vals = _top3(times)
            L1, L2 = p.class_load[i1], p.class_load[items]  # [C], [K, C]
            ld1, ld2 = int(p.load[i1] > 0), (p.load[items] > 0).astype(np.int64)
            row1 = (p.contact[j1] * ((cnt[j1] - ld1 + ld2) > 0)[:, None]
                    + (loads[:, j1][None, :] - L1[None, :] + L2) * p.pt[li, j1])  # [K, C]
            row2 = (p.contact[j2][:, None] * ((cnt[j2] - ld2 + ld1) > 0)[:, None]
                    + (loads[:, j2].T - L2 + L1[None, :]) * p.pt[li, j2][:, None])  # [K, C]
            out = (order[None, :, :] == j1) | (order[None, :, :] == j2[:, None, None])  # [K, C, 3]
            excl = np.where(out, -np.inf, vals[None, :, :]).max(axis=2)  # max over the untouched sites
            newval = np.maximum(np.maximum(excl, row1), row2) @ p.prior  # [K]
            gains = gains + p.w_lat * (newval - self.layer_val[li])
        return np.where(ok, gains, np.inf)

    def _improves(self, delta: float) -> bool:
        return delta < -_TOL * max(1.0, abs(self.value))

    def _swap(self, i1: int, i2: int) -> None:
        j1, j2 = int(self.a[i1]), int(self.a[i2])
        self._apply(i1, j2)
        self._apply(i2, j1)

    def local_search(self, max_passes: int = 200) -> None:
        """Until no step improves: move one expert; else swap two experts of one layer; else (when memory binds)
        the best swap of two experts of different layers."""
        p = self.p
        by_layer = [np.flatnonzero(p.item_layer == li) for li in range(len(p.stats.layers))]
        capped = bool(np.any(np.isfinite(p.free)))
        for _ in range(max_passes):
            improved = False
            for i in range(p.num_items):
                d = self.move_deltas(i)
                j = int(np.argmin(d))
                if self._improves(d[j]):
                    self._apply(i, j)
                    improved = True
            if improved:
                continue
            for items in by_layer:
                for i1 in items:
                    gains = self.same_layer_swaps(int(i1), items)
                    k = int(np.argmin(gains))
                    if self._improves(gains[k]):
                        self._swap(int(i1), int(items[k]))
                        improved = True
            if improved or not capped:
                if improved:
                    continue
                return
            # Experts of different layers never share a layer's max, so a swap's change is the sum of two
            # independent moves: D[i1, site of i2] + D[i2, site of i1]. All pairs at once; memory checked per pair.
            D = np.stack([self.move_deltas(i, room=False) for i in range(p.num_items)])
            a = self.a
            M = D[:, a]
            gain = M + M.T
            dw = p.weight[None, :] - p.weight[:, None]  # [i1, i2]: w2 - w1
            fits = ((self.used[a][:, None] + dw <= p.free[a][:, None] + 1e-6)
                    & (self.used[a][None, :] - dw <= p.free[a][None, :] + 1e-6))
            mask = fits & (p.item_layer[:, None] != p.item_layer[None, :]) & (a[:, None] != a[None, :])
            gain = np.where(mask & np.isfinite(gain), gain, np.inf)
            threshold = -_TOL * max(1.0, abs(self.value))
            i1s, i2s = np.nonzero(np.triu(gain < threshold, 1))
            if not len(i1s):
                return
            # Apply the best improving swaps that touch disjoint layers and sites: each one's gain stays exact.
            busy_layers: set[int] = set()
            busy_sites: set[int] = set()
            for k in np.argsort(gain[i1s, i2s], kind="stable"):
                i1, i2 = int(i1s[k]), int(i2s[k])
                layers = {int(p.item_layer[i1]), int(p.item_layer[i2])}
                sites = {int(a[i1]), int(a[i2])}
                if layers & busy_layers or sites & busy_sites:
                    continue
                self._swap(i1, i2)
                busy_layers |= layers
                busy_sites |= sites


def _first_fit(p: Problem) -> np.ndarray | None:
    """A feasible assignment by best-fit decreasing on weight, or None (bin packing is hard: this may miss one)."""
    a = np.full(p.num_items, -1, dtype=np.int64)
    used = np.zeros(p.num_sites)
    for i in np.argsort(-p.weight, kind="stable"):
        room = p.free - used - p.weight[i]
        ok = p.allowed[i] & (room >= -1e-6)
        if not ok.any():
            return None
        room = np.where(ok, room, np.inf)
        j = int(np.argmin(room))
        a[i] = j
        used[j] += p.weight[i]
    return a


def heuristic_assignment(problem: Problem, *, seed: int = 0, rounds: int | None = None) -> np.ndarray | None:
    """Greedy + local search + ``rounds`` seeded perturbations (default by instance size); None when no feasible
    assignment was found."""
    p = problem
    if p.num_items == 0:
        return np.zeros(0, dtype=np.int64)
    if rounds is None:
        size = p.num_items * p.num_sites
        rounds = 30 if size <= 1_000 else 8 if size <= 5_000 else 3
    rng = np.random.default_rng(seed)
    starts: list[np.ndarray] = []
    for order in (np.lexsort((-p.weight, -p.load)), np.lexsort((-p.load, -p.weight))):
        s = _Search(p)
        if s.greedy(order):
            starts.append(s.a.copy())
    ff = _first_fit(p)
    if ff is not None:
        starts.append(ff)
    if not starts:
        return None
    best_a, best_v = None, np.inf
    for a0 in starts:
        s = _Search.start(p, a0)
        s.local_search()
        if best_a is None or s.value < best_v - _TOL * max(1.0, abs(best_v)):
            best_a, best_v = s.a.copy(), s.value
    assert best_a is not None
    k = max(2, min(8, p.num_items // 8))
    for _ in range(rounds):
        s = _Search.start(p, best_a)
        for i in rng.choice(p.num_items, size=min(k, p.num_items), replace=False):
            room = s._room(int(i))
            room[s.a[i]] = False
            choices = np.flatnonzero(room)
            if len(choices):
                s._apply(int(i), int(rng.choice(choices)))
        s.local_search()
        if s.value < best_v - _TOL * max(1.0, abs(best_v)):
            best_a, best_v = s.a.copy(), s.value
    return best_a


# ============================================================================================ replicas


def background_experts(stats: Stats, layer: int) -> list[int]:
    """Experts of ``layer`` that most classes use (affinity above uniform for at least half of the classes
    with images), hottest first; ties by index."""
    ls = stats.layer(layer)
    has_images = stats.class_images > 0
    aff = ls.affinity[has_images] if has_images.any() else ls.affinity
    users = (aff >= 1.0 / ls.num_experts).sum(axis=0)
    keep = [e for e in range(ls.num_experts) if users[e] * 2 >= len(aff) and ls.load_mean[e] > 0]
    return sorted(keep, key=lambda e: (-ls.load_mean[e], e))


def skip_fractions(stats: Stats, *, share: float, layers: Collection[int] | None = None) -> list[np.ndarray]:
    """Per MoE layer of ``stats`` (in order), the share [E] of each expert's patches a background-skip rule keeps
    off the wire, in expectation: ``share`` (of low router confidence) for the background experts of the layers the
    rule applies at (:func:`moevit.offwire.skip_layers`: ``layers``, None = every MoE layer; ValueError for one that
    is not an MoE layer), 0 elsewhere; what the simulator draws without a trace (``low_confidence_share``,
    ``skip_layers``), for :func:`~moevit.partition.costmodel.evaluate_placement`'s ``offwire``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    skipping = skip_layers(layers, stats.moe_layers())
    out = []
    for ls in stats.layers:
        f = np.zeros(ls.num_experts)
        if ls.layer in skipping:
            f[background_experts(stats, ls.layer)] = share
        out.append(f)
    return out


def add_replicas(
    topology: Topology,
    stats: Stats,
    placement: Placement,
    *,
    per_layer: int,
    objective: str,
    weights: Mapping[str, float] | None,
    wire_bytes: int = 2,
    replica_policy: str = "local-first",
    scenarios: str = "class",
    offwire: Sequence[np.ndarray] | None = None,
    offwire_action: str = "residual",
) -> Placement:
    """Give up to ``per_layer`` background experts of each layer a copy on the coordinator's site, hottest first,
    each only when it fits the coordinator's memory and lowers the objective (with ``offwire``: as a skip rule
    leaves it, see :func:`~moevit.partition.costmodel.evaluate_placement`)."""
    if per_layer <= 0:
        return placement
    coef = coefficients(topology, stats, wire_bytes=wire_bytes)
    kw = dict(wire_bytes=wire_bytes, replica_policy=replica_policy, scenarios=scenarios, coef=coef,
              offwire=offwire, offwire_action=offwire_action)
    cost = evaluate_placement(topology, stats, placement, **kw)
    best = objective_value(cost, objective, weights)
    coord = topology.coordinator
    assignment = dict(placement.assignment)
    for ls in stats.layers:
        added = 0
        for e in background_experts(stats, ls.layer):
            if added >= per_layer:
                break
            if coord in assignment[(ls.layer, e)]:
                continue
            trial = dict(assignment)
            trial[(ls.layer, e)] = (*assignment[(ls.layer, e)], coord)
            cand = Placement(trial, fingerprint=placement.fingerprint)
            c = evaluate_placement(topology, stats, cand, **kw)
            v = objective_value(c, objective, weights)
            if c.feasible and v < best - _TOL * max(1.0, abs(best)):
                assignment, best = trial, v
                added += 1
    return Placement(assignment, fingerprint=placement.fingerprint)


# ============================================================================================ baselines


def round_robin(topology: Topology, stats: Stats) -> Placement:
    """The topology's default placement: expert e of each layer on the (e mod n)-th site sorted by name."""
    return default_placement(topology, stats.moe_layers())


def all_on_coordinator(topology: Topology, stats: Stats) -> Placement:
    return Placement({(ls.layer, e): (topology.coordinator,) for ls in stats.layers for e in range(ls.num_experts)})


def random_placement(topology: Topology, stats: Stats, *, seed: int = 0, wire_bytes: int = 2) -> Placement:
    """Each expert (in layer, expert order) to a seeded uniformly random reachable site with room left; when none
    has room, to any reachable site (the result then shows as infeasible)."""
    coef = coefficients(topology, stats, wire_bytes=wire_bytes)
    rng = np.random.default_rng(seed)
    used = np.zeros(len(coef.sites))
    out: dict[tuple[int, int], tuple[str, ...]] = {}
    for ls in stats.layers:
        for e in range(ls.num_experts):
            ok = coef.reachable & (used + ls.expert_weight_bytes <= coef.free_bytes + 1e-6)
            choices = np.flatnonzero(ok) if ok.any() else np.flatnonzero(coef.reachable)
            j = int(rng.choice(choices))
            used[j] += ls.expert_weight_bytes
            out[(ls.layer, e)] = (coef.sites[j],)
    return Placement(out)


# ============================================================================================ the entry point


@dataclass(frozen=True)
class Baseline:
    name: str
    placement: Placement
    cost: ImageCost
    value: float

    @property
    def feasible(self) -> bool:
        return self.cost.feasible


@dataclass(frozen=True)
class PlacementResult:
    """The chosen placement, its cost and objective, how it was found, and the baselines beside it."""

    placement: Placement
    cost: ImageCost
    objective: str
    weights: dict[str, float]
    value: float
    method: str
    milp: MilpOutcome | None
    heuristic_value: float | None
    seconds: float
    baselines: tuple[Baseline, ...]


def place(
    topology: Topology,
    stats: Stats,
    *,
    objective: str = "latency",
    weights: Mapping[str, float] | str | None = None,
    wire_bytes: int = 2,
    method: str = "auto",
    time_limit: float = 10.0,
    replicas: int = 0,
    replica_policy: str = "local-first",
    scenarios: str = "class",
    seed: int = 0,
    baselines: bool = True,
    offwire: Sequence[np.ndarray] | None = None,
    offwire_action: str = "residual",
) -> PlacementResult:
    """Place every expert of ``stats``' MoE layers on ``topology``'s sites, minimising ``objective``.

    ``offwire``/``offwire_action``: a background-skip rule (:func:`skip_fractions`; ``residual``: dropped,
    ``local``: computed on the coordinator): the placement is optimised, and it and the baselines are costed, with
    those patches off the wire. Raises ValueError (naming the shortfall) when memory cannot hold the model, and for
    bad arguments.
    """
    if offwire_action not in ("residual", "local"):
        raise ValueError(f"offwire_action must be residual or local, got {offwire_action!r}")
    if offwire is not None:
        offwire = check_offwire(stats, offwire)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if replica_policy not in REPLICA_POLICIES:
        raise ValueError(f"replica policy must be one of {', '.join(REPLICA_POLICIES)}, got {replica_policy!r}")
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    t0 = time.perf_counter()
    w = _weights_for(objective, weights)
    coef = coefficients(topology, stats, wire_bytes=wire_bytes)
    check_memory(topology, stats, coef)
    problem = Problem.build(topology, stats, objective=objective, weights=weights, wire_bytes=wire_bytes,
                            scenarios=scenarios, coef=coef, offwire=offwire)
    candidates: list[tuple[float, int, str, np.ndarray]] = []
    h = None if method == "milp" else heuristic_assignment(problem, seed=seed)
    h_value = None if h is None else problem.value(h)
    if h is not None:
        candidates.append((h_value, 0, "heuristic", h))
    outcome: MilpOutcome | None = None
    binaries = problem.num_items * problem.num_sites
    if method == "milp" or (method == "auto" and binaries <= MILP_MAX_BINARIES):
        outcome = milp_assignment(problem, time_limit=time_limit)
        if outcome.assignment is not None:
            candidates.append((outcome.value, 1, f"milp ({outcome.status})", outcome.assignment))
    elif method == "auto":
        outcome = MilpOutcome(None, f"skipped ({binaries} binaries > {MILP_MAX_BINARIES})", None, None, 0.0)
    if not candidates:
        why = outcome.status if outcome is not None else "no feasible assignment found"
        raise ValueError(
            f"{topology.path}: no placement fits the memory caps (MILP: {why}); the experts need "
            f"{stats.expert_bytes_total / MB:.2f} MB, free per site: "
            + ", ".join(f"{n} {max(f, 0) / MB:.2f} MB" for n, f in zip(coef.sites, coef.free_bytes, strict=True)))
    # Lowest objective wins; on a tie the heuristic (listed first), whose result never depends on the clock.
    value, _, how, a = min(candidates, key=lambda t: (t[0] + _TOL * max(1.0, abs(t[0])) * t[1], t[1]))
    placement = problem.to_placement(a, fingerprint=stats.fingerprint)
    placement = add_replicas(topology, stats, placement, per_layer=replicas, objective=objective, weights=w,
                             wire_bytes=wire_bytes, replica_policy=replica_policy, scenarios=scenarios,
                             offwire=offwire, offwire_action=offwire_action)
    kw = dict(wire_bytes=wire_bytes, replica_policy=replica_policy, scenarios=scenarios, coef=coef,
              offwire=offwire, offwire_action=offwire_action)
    cost = evaluate_placement(topology, stats, placement, **kw)
    value = objective_value(cost, objective, w)
    base: list[Baseline] = []
    if baselines:
        for name, pl in (("round-robin", round_robin(topology, stats)),
                         (f"random (seed {seed})", random_placement(topology, stats, seed=seed,
                                                                   wire_bytes=wire_bytes)),
                         ("all-on-coordinator", all_on_coordinator(topology, stats))):
            bc = evaluate_placement(topology, stats, pl, **kw)
            base.append(Baseline(name, pl, bc, objective_value(bc, objective, w)))
        if offwire is not None:  # what the rule gains by being known to the placement, not only applied after it
            pl = place(topology, stats, objective=objective, weights=weights, wire_bytes=wire_bytes, method=method,
                       time_limit=time_limit, replicas=replicas, replica_policy=replica_policy,
                       scenarios=scenarios, seed=seed, baselines=False).placement
            bc = evaluate_placement(topology, stats, pl, **kw)
            base.append(Baseline("placed without the skip rule", pl, bc, objective_value(bc, objective, w)))
    return PlacementResult(placement=placement, cost=cost, objective=objective, weights=w, value=value, method=how,
                           milp=outcome, heuristic_value=h_value, seconds=time.perf_counter() - t0,
                           baselines=tuple(base))


# ============================================================================================ report


def _fmt_value(objective: str, v: float) -> str:
    if objective == "latency":
        return f"{v * 1e3:.3f} ms"
    if objective == "energy":
        return f"{v * 1e3:.3f} mJ"
    if objective == "bytes":
        return f"{v / 1e3:.2f} kB"
    return f"{v:.6g}"


def format_report(result: PlacementResult) -> str:
    """The per-site table of the chosen placement and the objective beside each baseline."""
    cost = result.cost
    lines = [f"{'site':<16} {'experts':>7} {'memory MB used/has':>19} {'tokens/img':>11} {'kB/img in+out':>14} "
             f"{'expert ms':>10} {'energy mJ':>10}"]
    for s in cost.sites.values():
        memory = f"{s.memory_mb:.3g}/{s.memory_cap_bytes / MB:.3g}" + ("" if s.fits else "!")
        lines.append(f"{s.site:<16} {s.experts:>7} {memory:>19} "
                     f"{s.tokens:>11.1f} {(s.bytes_in + s.bytes_out) / 1e3:>14.2f} {s.compute_s * 1e3:>10.3f} "
                     f"{s.energy_j * 1e3:>10.3f}")
    lines.append("")
    lines.append(f"objective: {result.objective}"
                 + (f" (weights {result.weights})" if result.objective == "weighted" else ""))
    lines.append(f"{'placement':<28} {'objective':>14} {'latency ms':>11} {'energy mJ':>10} {'kB/img':>9}  note")

    def row(name: str, c: ImageCost, v: float, note: str) -> str:
        return (f"{name:<28} {_fmt_value(result.objective, v):>14} {c.latency_s * 1e3:>11.3f} "
                f"{c.energy_j * 1e3:>10.3f} {c.bytes / 1e3:>9.2f}  {note}")

    lines.append(row(f"chosen: {result.method}", cost, result.value, ""))
    for b in result.baselines:
        if b.feasible:
            if result.value > 0:
                note = f"{b.value / result.value:.2f}x the chosen"
            else:  # the chosen costs nothing (e.g. no byte leaves the coordinator): no ratio to give
                note = "as the chosen" if b.value <= 0 else f"+{_fmt_value(result.objective, b.value)} over the chosen"
        else:
            note = "infeasible (memory: " + "; ".join(b.cost.memory_shortfall()) + ")"
        lines.append(row(b.name, b.cost, b.value, note))
    found = []
    if result.heuristic_value is not None:
        found.append(f"heuristic {_fmt_value(result.objective, result.heuristic_value)}")
    if result.milp is not None:
        m = result.milp
        v = f" {_fmt_value(result.objective, m.value)}" if m.value is not None else ""
        found.append(f"MILP {m.status}{v} in {m.seconds:.2f} s")
    lines.append("search: " + "; ".join(found))
    return "\n".join(lines)
