"""The split model on the camera site: the whole network in-process, with each MoE layer's dispatcher sending
tokens to the sites of the placement. Checks that every worker serves the same model and hosts its experts."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.dispatcher import ForwardContext, RemoteDispatcher
from coordinator.sites import SiteClient, SiteError
from moevit.checkpoint import load_checkpoint, model_fingerprint
from moevit.mobilevitv2 import MobileViTV2
from partition.topology import Placement, Topology


class CoordinatorError(RuntimeError):
    """The deployment cannot run as described; the message says what to fix."""


@dataclass
class BatchResult:
    logits: torch.Tensor
    degraded: torch.Tensor
    failures: list[str]
    seconds: float


class SplitRuntime:
    """``model`` with its MoE layers dispatched over ``topology``'s sites per ``placement``."""

    def __init__(self, model: MobileViTV2, topology: Topology, placement: Placement, *, wire: str = "fp16",
                 deadline_s: float = 10.0, max_message_mb: float = 64.0) -> None:
        if model.config.moe is None:
            raise CoordinatorError("the model has no MoE layers: nothing to split (run moe-convert first)")
        self.model, self.topology, self.placement = model.eval(), topology, placement
        self.fingerprint = model_fingerprint(model)
        self.local_site = topology.coordinator
        self.context = ForwardContext()
        remote = sorted({s for (_, _), sites in placement.assignment.items() for s in sites} - {self.local_site})
        self.clients = {name: SiteClient(name, topology.site(name).address, fingerprint=self.fingerprint, wire=wire,
                                         deadline_s=deadline_s, max_message_mb=max_message_mb) for name in remote}
        for layer_id, layer in model.moe_layers().items():
            routes = {e: self._choose(placement.sites_for(layer_id, e)) for e in range(layer.num_experts)}
            bank = layer.experts
            if topology.fallback != "local":
                # the camera site keeps only the experts placed on it (what the cost model charges it for);
                # the `local` fallback needs a copy of every expert
                bank = bank.subset([e for e, site in sorted(routes.items()) if site == self.local_site])
                layer.experts = bank
            layer.set_dispatcher(RemoteDispatcher(layer_id, bank, routes, self.clients,
                                                  local_site=self.local_site, context=self.context,
                                                  fallback=topology.fallback))

    def _choose(self, sites: tuple[str, ...]) -> str:
        """The coordinator's own copy when placed there, otherwise the first replica."""
        return self.local_site if self.local_site in sites else sites[0]

    @classmethod
    def from_topology(cls, topology: Topology, *, model_path: str | Path | None = None, **kw: Any) -> SplitRuntime:
        path = model_path or topology.model
        if path is None:
            raise CoordinatorError(f"{topology.path}: no model: set `model:` in the topology or pass --model")
        if not Path(path).exists():
            raise CoordinatorError(f"{topology.path}: model file {path} does not exist")
        model = load_checkpoint(path)
        if model.config.moe is None:
            raise CoordinatorError(f"{path}: a dense model; the coordinator needs an MoE checkpoint (moe-convert)")
        placement = topology.resolve_placement({i: m.num_experts for i, m in model.moe_layers().items()})
        return cls(model, topology, placement, **kw)

    def check_workers(self) -> dict[str, Any]:
        """Every remote site answers Info with our fingerprint and hosts what the placement gives it."""
        infos = {}
        for name, client in self.clients.items():
            info = client.info()
            if info.model_fingerprint != self.fingerprint:
                raise CoordinatorError(
                    f"site {name} ({client.address}) serves model {info.model_fingerprint}, the coordinator runs "
                    f"{self.fingerprint}: start the worker with the same model file")
            hosted = {hl.layer: set(hl.experts) for hl in info.layers}
            need = self.placement.experts_on(name)
            missing = {layer: sorted(set(es) - hosted.get(layer, set())) for layer, es in need.items()}
            missing = {k: v for k, v in missing.items() if v}
            if missing:
                raise CoordinatorError(f"site {name} ({client.address}) does not host experts the placement gives "
                                       f"it: {missing}; restart it with the same topology/placement")
            infos[name] = info
        return infos

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> BatchResult:
        """Logits of a batch; raises :class:`SiteError` (fallback ``fail``) naming the site that failed."""
        self.context.begin(len(x))
        t0 = time.perf_counter()
        logits = self.model(x)
        return BatchResult(logits, self.context.degraded.clone(), list(self.context.failures),
                           time.perf_counter() - t0)

    def traffic(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, c in self.clients.items():
            t = c.traffic
            out[name] = {"calls": t.calls, "failures": t.failures, "bytes_sent": t.bytes_sent,
                         "bytes_received": t.bytes_received, "tokens": t.tokens}
        return out

    def tokens_by_site(self) -> dict[str, int]:
        per_site: dict[str, int] = defaultdict(int)
        for (layer, e), n in self.context.tokens.items():
            per_site[self._choose(self.placement.sites_for(layer, e))] += n
        return dict(per_site)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


__all__ = ["BatchResult", "CoordinatorError", "SiteError", "SplitRuntime"]
