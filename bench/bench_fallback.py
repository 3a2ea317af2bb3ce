"""Fallback benchmark: top-1 against the fraction of experts unavailable, one curve per ``fallback:`` policy.

    .venv/bin/python bench/bench_fallback.py [--model runs/demo/moe.safetensors] [--seeds 5] [--quick]
                                             [--out bench/results/fallback.json]

Model and data: the trained demo model (``runs/demo/moe.safetensors``: 64 px digits, MoE layers [1, 5, 8], E = 8;
``.venv/bin/python -m moevit.coordinator.demo`` builds it) on all 1797 bundled scikit-learn digits at the model's image
size, preprocessed as evaluation does (``moevit.data.open_dataset``, the ``train`` and ``eval`` splits together;
top-1 on the seeded 20 % ``eval`` holdout alone is recorded too).

How experts are made unavailable: every MoE layer gets a :class:`coordinator.dispatcher.RemoteDispatcher`, the
coordinator's real dispatcher, set up as :class:`coordinator.runtime.SplitRuntime` does (the coordinator's bank
holds only its own experts, or every expert for the ``local`` fallback). An available expert is placed on the
coordinator's own site (computed in-process from the layer's bank); an unavailable one on a site whose client
reports ``up == False``, so the dispatcher never calls it and falls back at once, as it does for a site whose
health watch says it is down. With ``k`` of E experts unavailable, each MoE layer loses its own random ``k``
experts: per seed and layer a seeded permutation of the experts, the first ``k`` of it down (so the subsets are
nested as ``k`` grows, and all policies see the same subsets). Fractions 0 and 1 do not depend on the seed.

Policies (topology ``fallback:``):

* ``fail``: a batch with any patch routed to an unavailable expert raises ``SiteError``; its images count as wrong.
  The coordinator classifies one image per request by default (``moe-coordinator --batch-size 1``), so the curve
  is per image: an image fails when its fault-free routing sends a patch to an unavailable expert at some layer
  (what the dispatcher does at batch 1: up to the first unavailable expert every layer's output is the fault-free
  one). Checked through the dispatcher at batch 1 on samples of images, half predicted to fail and half not, and
  against the images the other policies' dispatchers mark degraded, which must be the same set. The same policy
  through the dispatcher at the benchmark's batch size (``--batch-size``, default 256) is recorded as
  ``fail_batch``.
* ``local``: the coordinator computes the expert from its own copy; must equal the fault-free model everywhere.
* ``nearest``: each patch of an unavailable expert goes to the available expert of that layer its router scored
  highest. ``skip``: those patches keep only the residual path.

Also: at 0 % unavailable every policy's logits are compared with the in-process model's; for every run, the
logits of images the dispatcher did not mark degraded are compared with the fault-free ones. Sites variant: the
placement of ``examples/sites.yaml`` (its ``placement:`` when set, else the default round-robin: camera-01 holds
experts 0, 3, 6 of each layer, pi-north 1, 4, 7, pi-south 2, 5) with whole sites down; sites that are up answer
through the worker's own request handling (``worker.service.validate_and_run``, fp32 on the wire). Sanity run
through real processes (skipped with ``--no-workers``): one ``moe-worker`` for pi-north on loopback, pi-south's
address with nothing listening, ``SplitRuntime`` (fp32 wire) under ``nearest`` and ``skip``, logits compared with
the in-process emulation of the same scenario.

Speed: the part of the forward before the stage holding the first MoE layer (stem, stages 0-1, stage 2's
downsampling block at layers [1, 5, 8]) cannot see the dispatcher; it runs once per image and is cached, each run
continues from there through the model's own modules (checked bit-identical to ``model(x)``, recorded as
``trunk_cache``). The fault-free reference and the ``fail`` checks at batch 1 run the whole ``model(x)``.

Writes JSON through ``bench/common.write_result``, a plot (matplotlib Agg; x = fraction unavailable, y = top-1,
one line per policy with its min-max band over seeds) next to it (``.png``), and prints a markdown table.
The runs are spread over ``--jobs`` forked processes (default 2) of ``--threads`` torch threads each (default 1).
About 7 minutes on the 2-core development machine at load average ~4 (7 CPU-minutes in all; ``--quick``: 2 seeds,
5 fractions, 512 images, about a minute).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, load_average, write_result  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moevit.coordinator.dispatcher import CallPolicy, DispatchCounters, ForwardContext, RemoteDispatcher  # noqa: E402
from moevit.coordinator.local import free_port  # noqa: E402
from moevit.coordinator.sites import PendingCall, SiteError, Traffic  # noqa: E402
from moevit.deploy.topology import Placement, load_topology  # noqa: E402
from moevit.worker.backends import TorchBackend  # noqa: E402
from moevit.worker.service import validate_and_run  # noqa: E402

from moevit.checkpoint import load_checkpoint, model_fingerprint  # noqa: E402
from moevit.data import open_dataset  # noqa: E402
from moevit.mobilevitv2 import MobileViTV2  # noqa: E402
from moevit.moe.routing import record_routing  # noqa: E402
from moevit_rpc.tensors import tensor_to_proto  # noqa: E402
from moevit_rpc.v1 import expert_pb2  # noqa: E402

DEMO_MODEL = REPO_ROOT / "runs" / "demo" / "moe.safetensors"
TOPOLOGY = REPO_ROOT / "examples" / "sites.yaml"
POLICIES = ("fail", "local", "nearest", "skip")
CAM = "cam"    # the coordinator's own site in the random-subset runs
DOWN = "down"  # the site every unavailable expert is placed on in those runs
COLORS = {"fail": "tab:red", "fail_batch": "tab:red", "local": "tab:green", "nearest": "tab:blue", "skip": "tab:orange"}


# ------------------------------------------------------------------------------------------------- fake sites
class DownSite:
    """A site the health watch reports down: the dispatcher never calls it."""

    def __init__(self, name: str) -> None:
        self.name, self.up, self.watch, self.traffic = name, False, None, Traffic()

    def start(self, *a: Any, **kw: Any) -> PendingCall:
        raise AssertionError(f"the dispatcher called site {self.name}, which is down")


class InProcessSite:
    """An up site answering through the worker's request handling (fp32 on the wire), without a network."""

    def __init__(self, name: str, model: MobileViTV2, hosted: dict[int, list[int]]) -> None:
        self.name, self.up, self.watch, self.traffic = name, True, None, Traffic()
        layers = model.moe_layers()
        self.backend = TorchBackend({i: layers[i].experts.subset(es) for i, es in hosted.items()})
        self.hosted = {i: set(es) for i, es in hosted.items()}
        self.fingerprint = model_fingerprint(model)
        self.calls = 0

    def start(self, layer: int, batches: list[tuple[int, torch.Tensor]], *, timeout: float | None = None,
              cancellable: bool = False) -> PendingCall:
        self.calls += 1
        req = expert_pb2.RunExpertsRequest(model_fingerprint=self.fingerprint, layer=layer, batches=[
            expert_pb2.ExpertTokens(expert=e, tokens=tensor_to_proto(x, "fp32")) for e, x in batches])
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(validate_and_run(self.backend, self.hosted, self.fingerprint, req))
        return PendingCall(self, fut, req.ByteSize(), sum(len(x) for _, x in batches), time.perf_counter())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- set-up
def install(model: MobileViTV2, policy: str, replicas: dict[int, dict[int, tuple[str, ...]]], clients: dict[str, Any],
            local_site: str) -> tuple[ForwardContext, DispatchCounters]:
    """A RemoteDispatcher per MoE layer, as SplitRuntime builds them (bank: the local site's experts, or all of
    them for ``local``); the layer's own bank is left whole so :func:`uninstall` restores the in-process model."""
    ctx, counters = ForwardContext(), DispatchCounters()
    pol = CallPolicy(deadline_s=10.0, fallback=policy)
    for i, layer in model.moe_layers().items():
        reps = replicas[i]
        bank = layer.experts
        if policy != "local":
            bank = bank.subset([e for e, sites in sorted(reps.items()) if local_site in sites])
        layer.set_dispatcher(RemoteDispatcher(i, bank, reps, clients, local_site=local_site, context=ctx,
                                              policy=pol, counters=counters))
    return ctx, counters


def uninstall(model: MobileViTV2) -> None:
    for layer in model.moe_layers().values():
        layer.set_dispatcher(None)


def random_replicas(model: MobileViTV2, down: dict[int, set[int]]) -> dict[int, dict[int, tuple[str, ...]]]:
    return {i: {e: (DOWN,) if e in down[i] else (CAM,) for e in range(layer.num_experts)}
            for i, layer in model.moe_layers().items()}


def unavailable(layers: list[int], num_experts: int, k: int, seed: int) -> dict[int, set[int]]:
    """Per layer, the first ``k`` experts of a permutation seeded by (seed, layer): nested in ``k``."""
    return {i: {int(e) for e in np.random.default_rng([seed, i]).permutation(num_experts)[:k]} for i in layers}


# ------------------------------------------------------------------------------------------------- trunk cache
class Trunk:
    """The forward split where the dispatcher first matters: everything before the stage holding the first MoE
    layer's MobileViT block (stem, earlier stages, that stage's downsampling block) runs once per image and is
    cached; :meth:`rest` runs the model's own modules from there (checked equal to ``model(x)`` bit for bit)."""

    def __init__(self, model: MobileViTV2) -> None:
        self.model = model
        first = min(model.moe_layers())
        depths = [len(stage[1].transformer) for stage in model.stages[2:]]
        self.stage = 2 + int(np.searchsorted(np.cumsum(depths), first, side="right"))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.stages[self.stage][0](m.stages[:self.stage](m.stem(x)))

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.stages[self.stage + 1:](m.stages[self.stage][1](h)))


# ------------------------------------------------------------------------------------------------- running
@torch.no_grad()
def run_model(trunk: Trunk, ctx: ForwardContext | None, hs: torch.Tensor, batch: int) -> dict[str, Any]:
    """From the cached trunk outputs ``hs``: logits (NaN rows for failed batches), failed and degraded masks, the
    errors raised."""
    n = len(hs)
    logits = torch.full((n, trunk.model.config.num_classes), float("nan"))
    failed = torch.zeros(n, dtype=torch.bool)
    degraded = torch.zeros(n, dtype=torch.bool)
    errors: list[str] = []
    for s in range(0, n, batch):
        x = hs[s:s + batch]
        if ctx is not None:
            ctx.begin(len(x))
        try:
            logits[s:s + len(x)] = trunk.rest(x)
        except SiteError as err:
            failed[s:s + len(x)] = True
            errors.append(str(err))
            continue
        if ctx is not None:
            degraded[s:s + len(x)] = ctx.degraded
    return {"logits": logits, "failed": failed, "degraded": degraded, "errors": errors}


def fault_free(trunk: Trunk, xs: torch.Tensor, batch: int
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor, float]:
    """Fault-free logits (``model(x)``, in-process dispatcher); per MoE layer, which experts each image's patches
    were routed to [N, E] (bool); the cached trunk outputs; max |rest(head(x)) - model(x)|."""
    model = trunk.model
    layers = model.moe_layers()
    logits, uses, hs = [], {i: [] for i in layers}, []
    diff = 0.0
    with torch.no_grad(), record_routing(model) as rec:
        for s in range(0, len(xs), batch):
            x = xs[s:s + batch]
            logits.append(model(x))
            for i, layer in layers.items():
                idx_BNK = rec[i].expert_idx_BNK
                u = torch.zeros(len(idx_BNK), layer.num_experts, dtype=torch.bool)
                u.scatter_(1, idx_BNK.reshape(len(idx_BNK), -1), True)
                uses[i].append(u)
            hs.append(trunk.head(x))
            diff = max(diff, (trunk.rest(hs[-1]) - logits[-1]).abs().max().item())
    return torch.cat(logits), {i: torch.cat(u) for i, u in uses.items()}, torch.cat(hs), diff


def summarize_run(out: dict[str, Any], ys: torch.Tensor, eval_mask: torch.Tensor, ref_logits: torch.Tensor,
                  counters: DispatchCounters | None, ctx: ForwardContext | None) -> dict[str, Any]:
    logits, failed, degraded = out["logits"], out["failed"], out["degraded"]
    pred = logits.argmax(1)
    correct = (pred == ys) & ~failed
    ref_pred = ref_logits.argmax(1)
    ok = ~failed
    clean = ok & ~degraded
    row: dict[str, Any] = {
        "top1": correct.float().mean().item(),
        "top1_eval_holdout": correct[eval_mask].float().mean().item(),
        "failed": failed.float().mean().item(),
        "degraded": degraded.float().mean().item(),
        "changed_vs_fault_free": ((pred != ref_pred) & ok).float().mean().item(),
        "max_abs_diff_all": (logits[ok] - ref_logits[ok]).abs().max().item() if ok.any() else None,
        "max_abs_diff_not_degraded": (logits[clean] - ref_logits[clean]).abs().max().item() if clean.any() else None,
    }
    if counters is not None and ctx is not None:
        total = sum(ctx.tokens.values())
        row["fallback_token_share"] = counters.fallback_tokens / total if total else 0.0
        row["substitute_batches"] = counters.substitutes
    if out["errors"]:
        row["first_error"] = out["errors"][0]
    return row


def per_image_fail(uses: dict[int, torch.Tensor], down: dict[int, set[int]]) -> torch.Tensor:
    """Images whose fault-free routing touches an unavailable expert at some MoE layer."""
    f = torch.zeros(len(next(iter(uses.values()))), dtype=torch.bool)
    for i, u in uses.items():
        if down[i]:
            f |= u[:, sorted(down[i])].any(1)
    return f


def check_fail_batch1(model: MobileViTV2, xs: torch.Tensor, ref_logits: torch.Tensor, predicted: torch.Tensor,
                      down: dict[int, set[int]], sample: torch.Tensor) -> dict[str, Any]:
    """The ``fail`` dispatcher at batch 1 on ``sample``: raises exactly for the images predicted to fail, and
    returns the fault-free logits for the others."""
    ctx, _ = install(model, "fail", random_replicas(model, down), {DOWN: DownSite(DOWN)}, CAM)
    try:
        raised = torch.zeros(len(sample), dtype=torch.bool)
        diff = 0.0
        with torch.no_grad():
            for j, i in enumerate(sample.tolist()):
                ctx.begin(1)
                try:
                    y = model(xs[i:i + 1])
                except SiteError:
                    raised[j] = True
                    continue
                diff = max(diff, (y[0] - ref_logits[i]).abs().max().item())
    finally:
        uninstall(model)
    return {"images": len(sample), "raised": int(raised.sum()), "predicted": int(predicted[sample].sum()),
            "mismatches": int((raised != predicted[sample]).sum()), "max_abs_diff_not_failed": diff}


# ------------------------------------------------------------------------------------------------- data
def load_digits(size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All bundled digits (the train and eval splits partition them), in the original order; eval-holdout mask."""
    rows: dict[int, tuple[torch.Tensor, int, bool]] = {}
    for split in ("train", "eval"):
        data = open_dataset("digits", image_size=size, split=split)
        for j, item in enumerate(data.items):
            x, y = data[j]
            rows[int(item)] = (x, int(y), split == "eval")
    order = sorted(rows)
    if limit:
        order = order[:limit]
    xs = torch.stack([rows[i][0] for i in order])
    ys = torch.tensor([rows[i][1] for i in order])
    return xs, ys, torch.tensor([rows[i][2] for i in order])


# ------------------------------------------------------------------------------------------------- sites variant
def sites_scenarios(model: MobileViTV2, topology_path: Path) -> tuple[Any, Placement, list[tuple[str, ...]]]:
    topo = load_topology(topology_path)
    placement = topo.resolve_placement({i: m.num_experts for i, m in model.moe_layers().items()})
    remote = sorted(set(placement.sites()) - {topo.coordinator})
    scenarios = [tuple(s for j, s in enumerate(remote) if mask >> j & 1) for mask in range(1, 2 ** len(remote))]
    return topo, placement, sorted(scenarios, key=lambda s: (len(s), s))


def sites_clients(model: MobileViTV2, placement: Placement, coordinator: str, down: tuple[str, ...]) -> dict[str, Any]:
    clients: dict[str, Any] = {}
    for site in sorted(set(placement.sites()) - {coordinator}):
        clients[site] = DownSite(site) if site in down else InProcessSite(site, model, placement.experts_on(site))
    return clients


def sites_replicas(model: MobileViTV2, placement: Placement) -> dict[int, dict[int, tuple[str, ...]]]:
    return {i: {e: tuple(placement.sites_for(i, e)) for e in range(layer.num_experts)}
            for i, layer in model.moe_layers().items()}


# ------------------------------------------------------------------------------------------------- real workers
def real_worker_check(model_path: Path, topology_path: Path, xs: torch.Tensor, batch: int, down_site: str,
                      expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``SplitRuntime`` over a real ``moe-worker`` for every remote site but ``down_site`` (nothing listens on its
    port), fp32 wire, under each fallback in ``expected``: top-1 agreement and logits vs the in-process emulation."""
    import yaml
    from moevit.coordinator.launcher import ensure_workers
    from moevit.coordinator.runtime import SplitRuntime
    from moevit.deploy.topology import read_yaml

    doc = read_yaml(topology_path)
    result: dict[str, Any] = {"down": down_site}
    with tempfile.TemporaryDirectory(prefix="bench-fallback-") as tmp:
        for site in doc["sites"].values():
            site["address"] = f"127.0.0.1:{free_port()}"
        doc["model"] = str(model_path.resolve())
        if isinstance(doc.get("placement"), str):  # a placement file beside the topology: keep pointing at it
            doc["placement"] = str((topology_path.parent / doc["placement"]).resolve())
        workers = None
        try:
            for policy, ref in expected.items():
                doc["fallback"] = policy
                path = Path(tmp) / f"sites-{policy}.yaml"
                path.write_text(yaml.safe_dump(doc))
                topo = load_topology(path)
                m = load_checkpoint(model_path).eval()
                placement = topo.resolve_placement({i: layer.num_experts for i, layer in m.moe_layers().items()})
                # BatchNorms left unfolded: the logits are compared with the emulation's unfolded model
                rt = SplitRuntime(m, topo, placement, wire="fp32", fold_bn=False)
                try:
                    if workers is None:
                        t0 = time.perf_counter()
                        workers = ensure_workers(str(path), {n: c for n, c in rt.clients.items() if n != down_site},
                                                 model=str(model_path), threads=1)
                        result["worker_start_s"] = time.perf_counter() - t0
                        result["workers"] = sorted(workers.procs)
                    rt.check_workers(wait_s=3.0)
                    t0 = time.perf_counter()
                    logits, degraded = [], []
                    for s in range(0, len(xs), batch):
                        r = rt.classify(xs[s:s + batch])
                        logits.append(r.logits)
                        degraded.append(r.degraded)
                    got, deg = torch.cat(logits), torch.cat(degraded)
                    result[policy] = {
                        "seconds": time.perf_counter() - t0, "down_at_start": rt.down_at_start,
                        "top1_agreement_with_emulation": (got.argmax(1) == ref.argmax(1)).float().mean().item(),
                        "max_abs_diff_vs_emulation": (got - ref).abs().max().item(),
                        "degraded": deg.float().mean().item(), "traffic": rt.traffic()}
                finally:
                    rt.close()
        finally:
            if workers is not None:
                workers.stop()
    return result


# ------------------------------------------------------------------------------------------------- output
def band(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    v = [r[key] for r in rows]
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def pct(b: dict[str, float], spread: bool = True) -> str:
    s = f"{100 * b['mean']:.1f}"
    if spread and b["max"] - b["min"] > 5e-4:
        s += f" ({100 * b['min']:.1f}–{100 * b['max']:.1f})"
    return s


def markdown(curves: dict[str, list[dict[str, Any]]], num_experts: int, batch: int) -> str:
    head = (f"| unavailable | fail: top-1 | fail: failed | fail, batch {batch}: top-1 | local | nearest | skip "
            "| degraded (nearest / skip) |")
    lines = [head, "|" + "---|" * 8]
    for j, pt in enumerate(curves["local"]):
        k = pt["unavailable_experts"]
        f, fb = curves["fail"][j], curves["fail_batch"][j]
        near, skip = curves["nearest"][j], curves["skip"][j]
        lines.append(f"| {k}/{num_experts} | {pct(f['top1'])} | {pct(f['failed'])} | {pct(fb['top1'])} "
                     f"| {pct(pt['top1'])} | {pct(near['top1'])} | {pct(skip['top1'])} "
                     f"| {pct(near['degraded'], False)} / {pct(skip['degraded'], False)} |")
    return "\n".join(lines)


def plot(path: Path, curves: dict[str, list[dict[str, Any]]], sites: list[dict[str, Any]], fault_free: float,
         title: str, batch: int) -> None:
    """Left: every policy, 0-100 %. Right: the policies that keep answering (local, nearest, skip), zoomed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.15]})
    labels = {"fail": "fail (per image, batch 1)", "fail_batch": f"fail (batch {batch})", "local": "local",
              "nearest": "nearest", "skip": "skip"}
    panels = (("local", "nearest", "skip", "fail", "fail_batch"), ("local", "nearest", "skip"))
    handles: dict[str, Any] = {}
    for ax, names in zip(axes, panels, strict=True):
        for name in names:
            pts = curves[name]
            x = [p["fraction"] for p in pts]
            mean = [100 * p["top1"]["mean"] for p in pts]
            lo = [100 * p["top1"]["min"] for p in pts]
            hi = [100 * p["top1"]["max"] for p in pts]
            style = "--" if name == "fail_batch" else "-"
            (handles[name],) = ax.plot(x, mean, style, marker="o", ms=3.5, color=COLORS[name], label=labels[name])
            ax.fill_between(x, lo, hi, color=COLORS[name], alpha=0.15, lw=0)
        for sc in sites:
            for name in names:
                if name in sc["policies"]:
                    ax.scatter([sc["fraction"]], [100 * sc["policies"][name]["top1"]], marker="s", s=46,
                               facecolors="none", edgecolors=COLORS[name], linewidths=1.3, zorder=5)
        ax.axhline(100 * fault_free, color="0.4", lw=0.8, ls=":")
        ax.set_xlabel("fraction of experts unavailable (in every MoE layer)")
        ax.set_ylabel("top-1 (%)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    left, right = axes
    left.set_ylim(-2, 104)
    left.text(1.0, 100 * fault_free - 4, f"fault-free {100 * fault_free:.2f} %", fontsize=7, color="0.4", ha="right")
    left.axhline(10, color="0.7", lw=0.8, ls=":")
    left.text(1.0, 11, "chance (10 classes)", fontsize=7, color="0.5", ha="right")
    for sc in sites:
        left.annotate("down: " + "+".join(sc["down"]), (sc["fraction"], 100 * sc["policies"]["fail"]["top1"]),
                      textcoords="offset points", xytext=(4, 8), fontsize=7, color="0.3", rotation=90)
    left.set_title("all policies", fontsize=9)
    vals = [100 * p["top1"][b] for n in panels[1] for p in curves[n] for b in ("min", "max")]
    vals += [100 * sc["policies"][n]["top1"] for sc in sites for n in panels[1]]
    span = max(vals) - min(vals)
    right.set_ylim(min(vals) - 0.15 * span - 0.1, max(vals) + 0.15 * span + 0.1)
    right.text(0.0, 100 * fault_free, f" fault-free {100 * fault_free:.2f} %", fontsize=7, color="0.4", va="bottom")
    for sc in sites:
        right.annotate("+".join(sc["down"]), (sc["fraction"], 100 * sc["policies"]["skip"]["top1"]),
                       textcoords="offset points", xytext=(5, -3), fontsize=7, color="0.3")
    right.set_title("policies that keep answering (zoom)", fontsize=9)
    legend = [handles[n] for n in ("local", "nearest", "skip", "fail", "fail_batch")]
    if sites:
        legend.append(Line2D([], [], ls="", marker="s", mfc="none", mec="0.3",
                             label="whole sites down\n(examples/sites.yaml\nplacement; colour =\npolicy; x = mean "
                                   "share\nof experts lost\nper layer)"))
    right.legend(handles=legend, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title + "; line: mean, band: min–max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- tasks
_S: dict[str, Any] = {}  # what every task reads (set by main; inherited by forked --jobs processes)


def _task(task: tuple[Any, ...]) -> dict[str, Any]:
    torch.set_num_threads(_S["threads"])
    return _random_task(*task[1:]) if task[0] == "random" else _sites_task(task[1])


def _run_policy(policy: str, replicas: dict[int, dict[int, tuple[str, ...]]], clients: dict[str, Any],
                local_site: str) -> tuple[dict[str, Any], dict[str, Any]]:
    S = _S
    ctx, counters = install(S["model"], policy, replicas, clients, local_site)
    try:
        res = run_model(S["trunk"], ctx, S["hs"], S["batch"])
    finally:
        uninstall(S["model"])
    return res, summarize_run(res, S["ys"], S["eval_mask"], S["ref_logits"], counters, ctx)


def _random_task(k: int, seed: int) -> dict[str, Any]:
    """``k`` random experts of every MoE layer down (seeded): the four policies."""
    S = _S
    model, E, eval_mask, ref_correct = S["model"], S["E"], S["eval_mask"], S["ref_correct"]
    down = unavailable(S["layers"], E, k, seed)
    base = {"unavailable_experts": k, "fraction": k / E, "seed": seed,
            "down": {str(i): sorted(d) for i, d in down.items()}}
    predicted = per_image_fail(S["uses"], down)
    correct = ref_correct & ~predicted
    out: dict[str, Any] = {"rows": [{**base, "policy": "fail", "top1": correct.float().mean().item(),
                                     "top1_eval_holdout": correct[eval_mask].float().mean().item(),
                                     "failed": predicted.float().mean().item(), "degraded": 0.0}]}
    if S["fail_check"] and k > 0 and (seed == S["first_seed"] or k == 1):
        # half predicted to fail, half not (as far as there are), so both outcomes are checked
        g = torch.Generator().manual_seed(1000 * k + seed)
        yes, no = predicted.nonzero().squeeze(1), (~predicted).nonzero().squeeze(1)
        yes, no = yes[torch.randperm(len(yes), generator=g)], no[torch.randperm(len(no), generator=g)]
        n_no = min(len(no), S["fail_check"] // 2)
        sample = torch.cat([no[:n_no], yes[:S["fail_check"] - n_no]])
        out["fail_check"] = {"unavailable_experts": k, "seed": seed,
                             **check_fail_batch1(model, S["xs"], S["ref_logits"], predicted, down, sample)}
    zero: dict[str, Any] = {}
    for policy in POLICIES:
        res, row = _run_policy(policy, random_replicas(model, down), {DOWN: DownSite(DOWN)}, CAM)
        if policy != "fail":  # degraded images = those whose fault-free routing touches an unavailable expert
            row["degraded_vs_fail_prediction_mismatches"] = int((res["degraded"] != predicted).sum())
        out["rows"].append({**base, "policy": "fail_batch" if policy == "fail" else policy, **row})
        if k == 0:
            zero[policy] = {"max_abs_diff": row["max_abs_diff_all"], "failed": row["failed"],
                            "degraded": row["degraded"]}
    if k == 0:
        out["zero_check"] = zero
    return out


def _sites_task(down_sites: tuple[str, ...]) -> dict[str, Any]:
    """The sites in ``down_sites`` down, the example topology's placement: the four policies."""
    S = _S
    model, placement, E, layers = S["model"], S["placement"], S["E"], S["layers"]
    lost = {i: {e for e in range(E) if all(s in down_sites for s in placement.sites_for(i, e))} for i in layers}
    predicted = per_image_fail(S["uses"], lost)
    pols: dict[str, Any] = {"fail": {"top1": (S["ref_correct"] & ~predicted).float().mean().item(),
                                     "failed": predicted.float().mean().item()}}
    logits: dict[str, torch.Tensor] = {}
    for policy in POLICIES:
        clients = sites_clients(model, placement, S["coordinator"], down_sites)
        res, row = _run_policy(policy, sites_replicas(model, placement), clients, S["coordinator"])
        row["calls"] = {n: getattr(c, "calls", 0) for n, c in clients.items()}
        pols["fail_batch" if policy == "fail" else policy] = row
        logits[policy] = res["logits"]
    site = {"down": list(down_sites), "unavailable_per_layer": {str(i): sorted(v) for i, v in lost.items()},
            "fraction": float(np.mean([len(lost[i]) / E for i in layers])), "policies": pols}
    return {"site": site, "logits": logits}


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--seeds", type=int, default=5, help="random subsets per fraction (seeds 0..N-1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/fallback.json, "
                    "fallback_quick.json with --quick); the plot goes next to it as .png")
    ap.add_argument("--quick", action="store_true", help="2 seeds, fractions 0, 1/4, 1/2, 3/4, 1; 512 images")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--jobs", type=int, default=2, help="processes running the runs (default 2; 1: in this one)")
    ap.add_argument("--topology", type=Path, default=TOPOLOGY, help="for the whole-sites variant")
    ap.add_argument("--fail-check", type=int, default=48,
                    help="images checked at batch 1 under fail, per fraction (first seed; every seed at 1/E)")
    ap.add_argument("--no-workers", action="store_true", help="skip the sanity run through a real moe-worker")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON at --out")
    args = ap.parse_args(argv)
    out = args.out or REPO_ROOT / "bench" / "results" / ("fallback_quick.json" if args.quick else "fallback.json")
    if args.replot:
        doc = json.loads(out.read_text(encoding="utf-8"))
        sites_doc = doc["sites_variant"]["scenarios"] if doc.get("sites_variant") else []
        plot(out.with_suffix(".png"), doc["curves"], sites_doc, doc["fault_free"]["top1"], doc["title"],
             doc["settings"]["batch_size"])
        print(f"wrote {out.with_suffix('.png')}")
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    if not args.model.exists():
        print(f"{args.model} does not exist: build it with `make demo`", file=sys.stderr)
        return 2
    seeds = list(range(2 if args.quick else args.seeds))
    load_before = load_average()
    t_start = time.perf_counter()

    model = load_checkpoint(args.model).eval()
    cfg = model.config
    layers = sorted(model.moe_layers())
    E = {model.moe_layers()[i].num_experts for i in layers}
    assert len(E) == 1, f"layers with different expert counts: {E}"
    E = E.pop()
    ks = [0, E // 4, E // 2, 3 * E // 4, E] if args.quick else list(range(E + 1))
    xs, ys, eval_mask = load_digits(cfg.image_size, 512 if args.quick else None)
    print(f"model {args.model} ({cfg.arch}, {cfg.image_size} px, MoE layers {layers}, E = {E}); {len(xs)} digits "
          f"({int(eval_mask.sum())} in the eval holdout); seeds {seeds}; batch {args.batch_size}; "
          f"{args.jobs} job(s) x {torch.get_num_threads()} thread(s)", flush=True)

    trunk = Trunk(model)
    t0 = time.perf_counter()
    ref_logits, uses, hs, trunk_diff = fault_free(trunk, xs, args.batch_size)
    pass_s = time.perf_counter() - t0
    if trunk_diff != 0.0:
        print(f"warning: the cached trunk changes the logits (max |Δ| {trunk_diff:.1e})", file=sys.stderr)
    ref_correct = ref_logits.argmax(1) == ys
    top1_ref = ref_correct.float().mean().item()
    print(f"fault-free top-1 {100 * top1_ref:.2f} % ({100 * ref_correct[eval_mask].float().mean():.2f} % on the "
          f"eval holdout); fault-free pass + trunk cache {pass_s:.1f} s (trunk: up to stages.{trunk.stage}.0)",
          flush=True)
    with torch.no_grad(), record_routing(model) as rec:
        model(xs[:1])
    patches = {i: int(rec[i].expert_idx_BNK.shape[1]) for i in layers}
    experts_per_image = {i: float(uses[i].sum(1).float().mean()) for i in layers}

    # ---- random subsets of experts down (every policy), and whole sites down: tasks over --jobs processes
    _S.update(model=model, trunk=trunk, hs=hs, xs=xs, ys=ys, eval_mask=eval_mask, ref_logits=ref_logits,
              ref_correct=ref_correct, uses=uses, layers=layers, E=E, batch=args.batch_size, threads=args.threads,
              fail_check=args.fail_check, first_seed=seeds[0])
    tasks: list[tuple[Any, ...]] = [("random", k, seed) for k in ks for seed in (seeds if 0 < k < E else seeds[:1])]
    topo = placement = None
    if args.topology.exists():
        topo, placement, scenarios = sites_scenarios(model, args.topology)
        _S.update(placement=placement, coordinator=topo.coordinator)
        tasks += [("sites", sc) for sc in scenarios]
    results: dict[tuple[Any, ...], Any] = {}

    def report(task: tuple[Any, ...], res: Any) -> None:
        results[task] = res
        if task[0] == "random":
            top = {r["policy"]: 100 * r["top1"] for r in res["rows"]}
            head = f"  {task[1]}/{E} unavailable, seed {task[2]}:"
        else:
            top = {p: 100 * v["top1"] for p, v in res["site"]["policies"].items()}
            head = f"  sites down {'+'.join(task[1])} ({res['site']['fraction']:.3f} of experts):"
        print(head + ", ".join(f" {p} {v:.1f}" for p, v in top.items())
              + f"  [{len(results)}/{len(tasks)}, {time.perf_counter() - t_start:.0f} s]", flush=True)

    if args.jobs > 1:
        import multiprocessing

        # fork: the children inherit the model and the cached trunk outputs (no gRPC channel exists yet)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            futs = {ex.submit(_task, t): t for t in tasks}
            for fut in concurrent.futures.as_completed(futs):
                report(futs[fut], fut.result())
    else:
        for t in tasks:
            report(t, _task(t))

    runs: list[dict[str, Any]] = []
    zero_check: dict[str, Any] = {}
    fail_checks: list[dict[str, Any]] = []
    for t in tasks:
        if t[0] == "random":
            runs += results[t]["rows"]
            zero_check.update(results[t].get("zero_check", {}))
            if "fail_check" in results[t]:
                fail_checks.append(results[t]["fail_check"])
    curves: dict[str, list[dict[str, Any]]] = {}
    for policy in ("fail", "fail_batch", "local", "nearest", "skip"):
        pts = []
        for k in ks:
            rs = [r for r in runs if r["policy"] == policy and r["unavailable_experts"] == k]
            pt = {"unavailable_experts": k, "fraction": k / E, "seeds": [r["seed"] for r in rs],
                  "seed_independent": k in (0, E)}
            for key in ("top1", "top1_eval_holdout", "failed", "degraded"):
                pt[key] = band(rs, key)
            if policy != "fail":
                pt["changed_vs_fault_free"] = band(rs, "changed_vs_fault_free")
                pt["fallback_token_share"] = band(rs, "fallback_token_share")
                diffs = [r["max_abs_diff_not_degraded"] for r in rs if r["max_abs_diff_not_degraded"] is not None]
                pt["max_abs_diff_not_degraded"] = max(diffs) if diffs else None
            if policy in ("local", "nearest", "skip"):
                pt["degraded_vs_fail_prediction_mismatches"] = sum(r["degraded_vs_fail_prediction_mismatches"]
                                                                   for r in rs)
            if policy == "local":
                pt["max_abs_diff_all"] = max(r["max_abs_diff_all"] for r in rs)
            pts.append(pt)
        curves[policy] = pts
    sites = [results[t]["site"] for t in tasks if t[0] == "sites"]
    site_logits = {t[1]: results[t]["logits"] for t in tasks if t[0] == "sites"}

    # ---- real moe-worker processes
    workers: dict[str, Any] | None = None
    if topo is not None and not args.no_workers:
        remote = sorted(set(placement.sites()) - {topo.coordinator})
        down_site = remote[-1]
        try:
            workers = real_worker_check(args.model, args.topology, xs, args.batch_size, down_site,
                                        {p: site_logits[(down_site,)][p] for p in ("nearest", "skip")})
        except Exception as e:  # noqa: BLE001 - optional: report, do not lose the main results
            workers = {"error": f"{type(e).__name__}: {e}"}
        print(f"  real workers ({down_site} down): " + ", ".join(
            f"{p}: agreement {100 * v['top1_agreement_with_emulation']:.2f} %, "
            f"max |Δ| {v['max_abs_diff_vs_emulation']:.1e}"
            for p, v in workers.items() if isinstance(v, dict) and "max_abs_diff_vs_emulation" in v)
            + (f" error {workers['error']}" if "error" in workers else ""), flush=True)

    elapsed = time.perf_counter() - t_start
    table = markdown(curves, E, args.batch_size)
    title = (f"{args.model.name}: {cfg.arch} {cfg.image_size} px, MoE {layers}, E={E}; {len(xs)} digits; "
             f"{len(seeds)} seeds")
    png = out.with_suffix(".png")
    payload = {
        "benchmark": "fallback",
        "settings": {"model": str(args.model), "arch": cfg.arch, "image_size": cfg.image_size, "moe_layers": layers,
                     "num_experts": E, "top_k": model.moe_layers()[layers[0]].top_k, "images": len(xs),
                     "eval_holdout_images": int(eval_mask.sum()), "data": "digits (train + eval splits: all bundled)",
                     "batch_size": args.batch_size, "threads": torch.get_num_threads(), "jobs": args.jobs,
                     "seeds": seeds,
                     "unavailable_experts": ks, "quick": args.quick,
                     "patches_per_image": {str(i): patches[i] for i in layers},
                     "distinct_experts_per_image": {str(i): experts_per_image[i] for i in layers},
                     "subsets": "per seed and layer, the first k of np.random.default_rng([seed, layer])"
                                ".permutation(E): nested in k, shared by all policies",
                     "fail": "per image (batch 1): failed iff its fault-free routing touches an unavailable expert; "
                             "fail_batch: through the dispatcher at batch_size, a raising batch fails all its images"},
        "fault_free": {"top1": top1_ref, "top1_eval_holdout": ref_correct[eval_mask].float().mean().item(),
                       "pass_seconds": pass_s},
        "trunk_cache": {"cached_up_to": f"stages.{trunk.stage}.0", "max_abs_diff_vs_model": trunk_diff},
        "zero_unavailable_vs_in_process": zero_check,
        "fail_batch1_checks": fail_checks,
        "curves": curves,
        "sites_variant": {"topology": str(args.topology), "scenarios": sites} if sites else None,
        "real_workers": workers,
        "runs": runs,
        "table": table,
        "title": title,
        "plot": str(png),
        "seconds": elapsed,
        "loadavg_before": load_before,
    }
    write_result(out, payload)
    plot(png, curves, sites, top1_ref, title, args.batch_size)
    print()
    print(table)
    print("\n0 % unavailable vs in-process, max |Δlogit|: "
          + ", ".join(f"{p} {v['max_abs_diff']:.1e}" for p, v in zero_check.items()))
    print(f"fail at batch 1 vs per-image prediction: {sum(c['mismatches'] for c in fail_checks)} mismatches in "
          f"{sum(c['images'] for c in fail_checks)} images ({sum(c['raised'] for c in fail_checks)} raised); "
          f"max |Δlogit| of the others {max([c['max_abs_diff_not_failed'] for c in fail_checks] or [0]):.1e}")
    print(f"wrote {out} and {png} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
