"""The split model on the camera site: the whole network in-process, with each MoE layer's dispatcher sending
tokens to the sites of the placement. Checks that every worker serves the same model and hosts its experts."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from moevit.coordinator.dispatcher import CallPolicy, DispatchCounters, ForwardContext, RemoteDispatcher
from moevit.coordinator.sites import SiteClient, SiteError
from moevit.deploy.topology import Placement, Topology, TopologyError

from moevit.calibration import default_for as default_calibration
from moevit.calibration import read_calibration
from moevit.checkpoint import load_checkpoint, model_fingerprint
from moevit.fuse import fold_batchnorm
from moevit.mobilevitv2 import MobileViTV2
from moevit.moe.skip import SkippingDispatcher, SkipRule, rules_per_layer

if TYPE_CHECKING:
    from moevit.onnx_camera import OnnxCameraConfig

log = logging.getLogger("moevit.coordinator")


class CoordinatorError(RuntimeError):
    """The deployment cannot run as described; the message says what to fix."""


@dataclass
class BatchResult:
    logits: torch.Tensor
    degraded: torch.Tensor
    failures: list[str]
    seconds: float
    strategy: str = "split"  # what served the batch (moevit.coordinator.strategies); split for a bare SplitRuntime
    extra: dict[str, Any] = field(default_factory=dict)  # added to each image's record (the policy's choice)
    # per image: the sites whose experts no replica served (empty when not degraded, or unknown: offload-image)
    missing: list[list[str]] = field(default_factory=list)


class SplitRuntime:
    """``model`` with its MoE layers dispatched over ``topology``'s sites per ``placement``.

    ``deadline_s``, ``hedge_ms`` and ``max_message_mb`` default to the topology's ``rpc`` section; ``wire``
    (a token codec name) replaces every site's ``rpc.codec`` when given. ``fold_bn``
    folds the trunk's BatchNorms into its convolutions (:func:`moevit.fuse.fold_batchnorm`), in ``model`` itself
    (the runtime takes the model over: it also installs its dispatchers), after the fingerprint is taken: the
    camera site's forward then takes about 0.88 of the time (``bench/bench_fold.py``); compare outputs with a model
    folded the same way.
    """

    def __init__(self, model: MobileViTV2, topology: Topology, placement: Placement, *, wire: str | None = None,
                 deadline_s: float | None = None, hedge_ms: float | None = None,
                 max_message_mb: float | None = None, watch: bool = True, fold_bn: bool = True,
                 skip: Mapping[int, SkipRule] | SkipRule | None = None,
                 onnx: OnnxCameraConfig | None = None, image_size: int | None = None) -> None:
        if model.config.moe is None:
            raise CoordinatorError("the model has no MoE layers: nothing to split (run moe-convert first)")
        self.model, self.topology, self.placement = model.eval(), topology, placement
        self.fingerprint = model_fingerprint(model)  # of the checkpoint's weights, as the workers compute it
        # logits -> probabilities and the blank filter; from_topology reads the checkpoint's (moe-calibrate)
        self.calibration = default_calibration(model.config.labels)
        if fold_bn:
            fold_batchnorm(self.model)
        # The camera side's forward: the model itself, or its segments on onnxruntime (moevit.onnx_camera), built
        # here while every expert is still in-process (int8 calibration runs them) and before the remote
        # dispatchers go in; either way each MoE layer's dispatcher below serves the dispatch points.
        self.camera: torch.nn.Module = self.model
        if onnx is not None:
            from moevit.onnx_camera import OnnxCamera, OnnxCameraError

            try:
                self.camera = OnnxCamera(self.model, self.fingerprint, image_size or model.config.image_size, onnx)
            except OnnxCameraError as e:
                raise CoordinatorError(str(e)) from None
        self.local_site = topology.coordinator
        self.context = ForwardContext()
        self.counters = DispatchCounters()
        self.down_at_start: list[str] = []
        rpc = topology.rpc
        self.policy = CallPolicy(deadline_s=deadline_s if deadline_s is not None else rpc.deadline_s,
                                 hedge_ms=hedge_ms if hedge_ms is not None else rpc.hedge_ms,
                                 fallback=topology.fallback)
        own_tls = topology.site(self.local_site).tls
        remote = sorted({s for (_, _), sites in placement.assignment.items() for s in sites} - {self.local_site})
        self.clients: dict[str, SiteClient] = {}
        try:
            for name in remote:
                site = topology.site(name)
                self.clients[name] = SiteClient(
                    name, site.address, fingerprint=self.fingerprint, wire=wire or topology.codec_for(name),
                    deadline_s=self.policy.deadline_s,
                    max_message_mb=max_message_mb if max_message_mb is not None else rpc.max_message_mb,
                    tls=own_tls, token=site.token(), watch=watch, stream=rpc.stream,
                    packed=rpc.packed)
        except (ValueError, TopologyError) as e:  # unusable TLS files or token file: say which
            self.close()
            raise CoordinatorError(str(e)) from None
        try:  # the layers a rule may apply at, decided as the simulator and the cost model decide them
            self.skip = rules_per_layer(skip, model.moe_layers())
        except ValueError:
            stray = sorted(set(skip) - set(model.moe_layers()))
            self.close()
            raise CoordinatorError(f"skip rules name layer(s) {', '.join(map(str, stray))}, which are not MoE layers "
                                   f"of the model (its MoE layers: {', '.join(map(str, sorted(model.moe_layers())))})"
                                   ) from None
        self.skippers: dict[int, SkippingDispatcher] = {}
        for layer_id, layer in model.moe_layers().items():
            replicas = {e: placement.sites_for(layer_id, e) for e in range(layer.num_experts)}
            bank = full = layer.experts
            rule = self.skip.get(layer_id)
            if topology.fallback != "local" and not (rule is not None and rule.action == "local"):
                # the camera site keeps only the experts placed on it (what the cost model charges it for);
                # the `local` fallback and skipping with a local copy need a copy of every expert
                bank = bank.subset([e for e, sites in sorted(replicas.items()) if self.local_site in sites])
                layer.experts = bank
            remote_dispatcher = RemoteDispatcher(layer_id, bank, replicas, self.clients, local_site=self.local_site,
                                                 context=self.context, policy=self.policy, counters=self.counters)
            if rule is None or not rule.active:
                layer.set_dispatcher(remote_dispatcher)
                continue
            # the rule (moevit.moe.skip) decides which remote patches stay off the wire
            self.skippers[layer_id] = SkippingDispatcher(
                remote_dispatcher, rule, local_bank=full if rule.action == "local" else None,
                remote=[e for e, sites in replicas.items() if self.local_site not in sites],
                patches_per_image=lambda tokens: max(1, tokens // max(1, self.context.batch_size)))
            layer.set_dispatcher(self.skippers[layer_id])

    def _choose(self, sites: tuple[str, ...]) -> str:
        """Where an expert's tokens go when every site is up: the coordinator's own copy, else the first replica."""
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
        runtime = cls(model, topology, placement, **kw)
        runtime.calibration = read_calibration(path, model.config.labels)
        return runtime

    def check_workers(self, wait_s: float = 5.0) -> dict[str, Any]:
        """Every reachable remote site answers Info with our fingerprint and hosts what the placement gives it.

        Sites still down after ``wait_s`` are tolerated when every expert has another reachable replica or the
        fallback is not ``fail`` (the run starts degraded and uses them once they report SERVING); otherwise a
        :class:`CoordinatorError` names them."""
        deadline = time.monotonic() + wait_s
        for client in self.clients.values():
            if client.watch is not None:
                client.watch.wait_up(max(0.0, deadline - time.monotonic()))
        infos, down = {}, []
        for name, client in self.clients.items():
            if not client.up:
                down.append(name)
                continue
            try:
                info = client.info()
            except SiteError as err:
                if err.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise CoordinatorError(f"site {name} ({client.address}) refused the coordinator's token: "
                                           f"{err}; check token_file in the topology") from None
                down.append(name)
                continue
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
            problem = client.codec_problem(list(info.codecs))
            if problem is not None:
                raise CoordinatorError(f"site {name} ({client.address}) {problem}")
            client.use_features(list(info.features))  # an older worker: unary calls, one tensor per expert
            infos[name] = info
        self.down_at_start = down
        if down:
            where = ", ".join(f"{n} ({self.clients[n].address})" for n in down)
            # a TLS mismatch looks like a dead site from the coordinator's side: say so
            tls_hint = (f"; if they serve TLS, give the coordinator site {self.local_site} its tls: entry (moe-certs): "
                        "a TLS worker never answers a plaintext coordinator"
                        if self.topology.site(self.local_site).tls is None else
                        "; if they listen without TLS, this coordinator (tls: on) cannot reach them either")
            orphans = [(layer, e) for (layer, e), sites in self.placement.assignment.items()
                       if self.local_site not in sites and not any(s in infos for s in sites)]
            if self.policy.fallback == "fail" and orphans:
                raise CoordinatorError(f"site(s) {where} not reachable (no SERVING health within {wait_s:g} s) and "
                                       f"{len(orphans)} expert(s) have no other replica, e.g. layer {orphans[0][0]} "
                                       f"expert {orphans[0][1]}; start the worker(s) or set fallback: "
                                       f"local|nearest|skip in the topology{tls_hint}")
            log.warning("site(s) %s not reachable yet: %d expert(s) without a reachable replica run under fallback "
                        "%r until they report SERVING%s", where, len(orphans), self.policy.fallback, tls_hint)
        return infos

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> BatchResult:
        """Logits of a batch; raises :class:`SiteError` (fallback ``fail``) naming the site that failed."""
        self.context.begin(len(x))
        t0 = time.perf_counter()
        logits = self.camera(x)
        return BatchResult(logits, self.context.degraded.clone(), list(self.context.failures),
                           time.perf_counter() - t0, missing=self.context.missing_sites())

    def traffic(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, c in self.clients.items():
            t = c.traffic
            out[name] = {"calls": t.calls, "failures": t.failures, "bytes_sent": t.bytes_sent,
                         "bytes_received": t.bytes_received, "tokens": t.tokens, "up": c.up}
        return out

    def skipped(self) -> dict[int, dict[str, Any]]:
        """Per MoE layer with a skip rule: the rule and the patches sent, kept off the wire, or local (so far)."""
        return {layer: {"rule": w.rule.describe(), **w.counts.as_dict()} for layer, w in sorted(self.skippers.items())}

    def tokens_by_site(self) -> dict[str, int]:
        per_site: dict[str, int] = defaultdict(int)
        for (layer, e), n in self.context.tokens.items():
            per_site[self._choose(self.placement.sites_for(layer, e))] += n
        return dict(per_site)

    def close(self) -> None:
        for c in getattr(self, "clients", {}).values():
            c.close()


__all__ = ["BatchResult", "CoordinatorError", "SiteError", "SplitRuntime"]
