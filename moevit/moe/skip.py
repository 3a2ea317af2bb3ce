"""Background skipping: a per-layer rule that keeps patches off the wire, and the dispatcher that applies it.

A patch stays off the wire when its expert is remote and the rule says so: its expert is a **background expert**
(one most classes use, as ``moe-analyze`` / :func:`moevit.partition.placement.background_experts` find them) and/or
its router **confidence** (top-1 probability) is under ``threshold`` (``match``: ``any`` of the two, or ``all`` of
the ones set), or it is past the layer's **capacity** (at most that many remote patches per image, the most confident
kept). Such a patch is then computed by a local copy of its expert (``action: local``) or passes through the
residual path with no expert output (``action: residual``).

The decision is the model's: :meth:`SkipRule.offwire` is one function of (expert, confidence, image) that the
coordinator's dispatcher (through :class:`SkippingDispatcher`), the simulator and the cost model all call, so they
agree on which patches travel. Nothing here knows about the network: a dispatcher is told which experts are remote.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from moevit.moe.dispatcher import Dispatcher, DispatchPlan
from moevit.moe.experts import ExpertBank
from moevit.offwire import skip_layers  # the layers a rule applies at: shared with the simulator and the cost model

ACTIONS = ("residual", "local")
MATCHES = ("any", "all")


@dataclass(frozen=True)
class SkipRule:
    """Which remote patches of one MoE layer stay off the wire (see the module docstring). The default rule keeps
    nothing off the wire."""

    threshold: float = 0.0
    background: frozenset[int] = field(default_factory=frozenset)
    action: str = "residual"
    match: str = "any"
    capacity: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", frozenset(int(e) for e in self.background))
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"skip threshold must be in [0, 1], got {self.threshold!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"skip action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.match not in MATCHES:
            raise ValueError(f"skip match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"skip capacity must be >= 0 or None, got {self.capacity!r}")

    @property
    def active(self) -> bool:
        return self.threshold > 0 or bool(self.background) or self.capacity is not None

    def offwire(self, experts: np.ndarray, confidence: np.ndarray, *, remote: Collection[int] | None = None,
                image: np.ndarray | None = None) -> np.ndarray:
        """bool per patch: off the wire. ``experts`` / ``confidence`` / ``image``: per patch (its expert, top-1
        probability, image index within the batch; ``image`` matters only with a capacity). Patches of experts not
        in ``remote`` (None: every expert is remote) never travel and are never marked."""
        experts = np.asarray(experts)
        confidence = np.asarray(confidence, dtype=np.float64)
        on_remote = np.ones(experts.shape, bool) if remote is None else np.isin(experts, list(remote))
        tests = []
        if self.threshold > 0:
            tests.append(confidence < self.threshold)
        if self.background:
            tests.append(np.isin(experts, list(self.background)))
        if tests:
            hit = np.logical_or.reduce(tests) if self.match == "any" else np.logical_and.reduce(tests)
        else:
            hit = np.zeros(experts.shape, bool)
        off = on_remote & hit
        if self.capacity is not None:
            image = np.zeros(experts.shape, np.int64) if image is None else np.asarray(image)
            travel = np.flatnonzero(on_remote & ~off)
            # per image, the most confident remote patches travel, the rest are over capacity
            order = travel[np.lexsort((-confidence[travel], image[travel]))]
            rank = np.zeros(len(order), np.int64)
            if len(order):
                starts = np.r_[0, np.flatnonzero(np.diff(image[order])) + 1]
                rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
            off[order[rank >= self.capacity]] = True
        return off

    def describe(self) -> dict:
        return {"threshold": self.threshold, "background": sorted(self.background), "action": self.action,
                "match": self.match, "capacity": self.capacity}


@dataclass
class SkipCounts:
    """Patches (top-k slots) of one layer over all forwards: sent to remote experts, kept off the wire (computed
    locally or left to the residual), and computed where they were anyway (local experts)."""

    sent: int = 0
    offwire_local: int = 0
    offwire_residual: int = 0
    local: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "offwire_local": self.offwire_local, "offwire_residual": self.offwire_residual,
                "local": self.local}


class SkippingDispatcher(Dispatcher):
    """Wraps another dispatcher (in-process or the coordinator's remote one): before its ``compute``, the patches
    :meth:`SkipRule.offwire` marks are taken out of the plan; they get zeros (``residual``) or ``local_bank``'s
    copy of their expert (``local``). ``remote``: the experts whose patches would travel (None: all).
    ``patches_per_image``: how many patches of a forward belong to one image (for the capacity; default: the
    whole forward is one image)."""

    wants_scores = True

    def __init__(self, inner: Dispatcher, rule: SkipRule, *, remote: Iterable[int] | None = None,
                 local_bank: ExpertBank | None = None,
                 patches_per_image: Callable[[int], int] | None = None) -> None:
        if rule.action == "local" and local_bank is None:
            raise ValueError("skip action 'local' needs a local copy of the experts (local_bank)")
        self.inner, self.rule, self.local_bank = inner, rule, local_bank
        self.remote = None if remote is None else frozenset(int(e) for e in remote)
        self.patches_per_image = patches_per_image
        self.counts = SkipCounts()
        self._lock = threading.Lock()

    def dispatch(self, x_TPC: torch.Tensor, expert_idx_TK: torch.Tensor,
                 scores_TE: torch.Tensor | None = None) -> DispatchPlan:
        return self.inner.dispatch(x_TPC, expert_idx_TK, scores_TE)

    def offwire(self, plan: DispatchPlan) -> torch.Tensor:
        """bool [S]: the plan's assignments the rule keeps off the wire."""
        expert_S = np.repeat(np.asarray(plan.experts, np.int64), plan.counts)
        if plan.scores_SE is None:
            raise ValueError("SkippingDispatcher needs the router's scores in the plan")
        conf_S = plan.scores_SE.max(dim=1).values.numpy()
        image_S = None
        if self.rule.capacity is not None:
            tokens = (plan.order_S // plan.top_k).numpy()
            per = self.patches_per_image(len(plan.order_S) // plan.top_k) if self.patches_per_image else None
            image_S = tokens // per if per else np.zeros_like(tokens)
        return torch.from_numpy(self.rule.offwire(expert_S, conf_S, remote=self.remote, image=image_S))

    def compute(self, layer_id: int, plan: DispatchPlan) -> list[torch.Tensor]:
        off_S = self.offwire(plan) if self.rule.active else torch.zeros(len(plan.order_S), dtype=torch.bool)
        n_off = int(off_S.sum())
        remote_S = (torch.ones_like(off_S) if self.remote is None else
                    torch.from_numpy(np.isin(np.repeat(np.asarray(plan.experts, np.int64), plan.counts),
                                             list(self.remote))))
        with self._lock:
            self.counts.sent += int((remote_S & ~off_S).sum())
            self.counts.local += int((~remote_S).sum())
            if self.rule.action == "local":
                self.counts.offwire_local += n_off
            else:
                self.counts.offwire_residual += n_off
        if n_off == 0:
            return self.inner.compute(layer_id, plan)
        keep = subset_plan(plan, ~off_S)
        ys = self.inner.compute(layer_id, keep) if keep.experts else []
        P, C = plan.x_SPC.shape[1:]
        y_SPC = plan.x_SPC.new_zeros(plan.x_SPC.shape)
        if ys:
            y_SPC[~off_S] = torch.cat([y.reshape(-1, P, C) for y in ys])
        if self.rule.action == "local":
            away = subset_plan(plan, off_S)
            local = [self.local_bank.forward_one(e, x) for e, x in zip(away.experts, away.chunks(), strict=True)]
            y_SPC[off_S] = torch.cat([y.reshape(-1, P, C) for y in local])
        return [y.reshape(-1, C) for y in torch.split(y_SPC, plan.counts)]


def subset_plan(plan: DispatchPlan, mask_S: torch.Tensor) -> DispatchPlan:
    """The plan's assignments where ``mask_S`` is true, still grouped by expert in the same order."""
    expert_S = torch.repeat_interleave(torch.tensor(plan.experts, dtype=torch.long), torch.tensor(plan.counts))
    kept = expert_S[mask_S]
    experts, counts = torch.unique_consecutive(kept, return_counts=True)
    return DispatchPlan(plan.order_S[mask_S], experts.tolist(), counts.tolist(), plan.x_SPC[mask_S], plan.top_k,
                        plan.scores_SE[mask_S] if plan.scores_SE is not None else None)


def apply_skip(model: torch.nn.Module, rules: dict[int, SkipRule], *,
               remote: dict[int, Iterable[int]] | None = None) -> dict[int, SkippingDispatcher]:
    """Wrap the dispatcher of each MoE layer named in ``rules`` (of ``model``, a MobileViTV2 with MoE layers) in a
    :class:`SkippingDispatcher`; ``remote``: per layer, the experts whose patches travel (None: all). The local
    copy for ``action: local`` is the layer's own expert bank. Returns the wrappers by layer."""
    out = {}
    for layer_id, layer in model.moe_layers().items():
        rule = rules.get(layer_id)
        if rule is None:
            continue
        wrapper = SkippingDispatcher(layer.dispatcher, rule, remote=None if remote is None else remote[layer_id],
                                     local_bank=layer.experts)
        layer.set_dispatcher(wrapper)
        out[layer_id] = wrapper
    return out


__all__ = ["ACTIONS", "MATCHES", "SkipCounts", "SkipRule", "SkippingDispatcher", "apply_skip", "rules_from_options",
           "rules_per_layer", "skip_layers", "subset_plan"]


def rules_per_layer(rules: SkipRule | Mapping[int, SkipRule] | None, moe_layers: Iterable[int]
                    ) -> dict[int, SkipRule]:
    """``rules`` as one rule per MoE layer: a single :class:`SkipRule` applies at every layer of ``moe_layers``, a
    mapping is kept as it is (its other layers send every patch). ValueError naming the layer(s) of the mapping
    that are not MoE layers (:func:`skip_layers`)."""
    layers = list(moe_layers)
    if isinstance(rules, SkipRule):
        return dict.fromkeys(layers, rules)
    per_layer = dict(rules or {})
    skip_layers(per_layer, layers)
    return per_layer


def rules_from_options(*, threshold: float = 0.0, action: str = "residual", match: str = "any",
                       capacity: int | None = None, analysis: str | None = None,
                       layers: Collection[int] | None = None) -> SkipRule | dict[int, SkipRule]:
    """The rule of ``moe-coordinator --skip-*``: one for every MoE layer, or, with ``analysis`` (``moe-analyze``'s
    ``analysis.json``), one per layer listed there with that layer's background experts; ``layers`` keeps the rule
    to those MoE layers (the others send every patch). ValueError naming the file when it cannot be read."""
    if analysis is None:
        rule = SkipRule(threshold=threshold, action=action, match=match, capacity=capacity)
        return rule if layers is None else {layer: rule for layer in layers}
    import json
    from pathlib import Path

    try:
        listed = json.loads(Path(analysis).read_text())["layers"]
        background = {int(k): [int(e) for e in v["background_experts"]] for k, v in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{analysis}: not a moe-analyze analysis.json with layers.<n>.background_experts ({e})") \
            from None
    return {layer: SkipRule(threshold=threshold, background=frozenset(bg), action=action, match=match,
                            capacity=capacity) for layer, bg in background.items()
            if layers is None or layer in layers}
