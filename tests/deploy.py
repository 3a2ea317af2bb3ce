"""Small seeded MoE models and topology files for tests that run split deployments on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

import moevit
from moevit.convert import capture_pre_mlp

DEVICE = {"gflops": 5, "memory_mb": 256, "active_w": 3, "idle_w": 1}


def small_moe_model(layers: tuple[int, ...] = (1, 5, 8), *, num_experts: int = 6, expert_hidden: int = 16,
                    num_classes: int = 5, labels: tuple[str, ...] | None = None, image_size: int | None = None,
                    calib_size: int = 128, correction: bool = True, seed: int = 0) -> moevit.MobileViTV2:
    """A random ``mobilevitv2_050`` with MoE layers whose routers spread patches over every expert (scalers and
    centroids from real patches of random images) and, with ``correction``, non-zero correction terms."""
    torch.manual_seed(seed)
    labels = tuple(labels) if labels is not None else tuple(chr(97 + i) for i in range(num_classes))
    moe = moevit.MoEConfig(layers=layers, num_experts=num_experts, expert_hidden=expert_hidden)
    extra = {} if image_size is None else {"image_size": image_size}
    m = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=num_classes, labels=labels,
                                              moe=moe, **extra)).eval()
    calib = torch.randn(8, 3, calib_size, calib_size, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        for i, layer in m.moe_layers().items():
            zbar = capture_pre_mlp(m, i, calib).mean(dim=2).reshape(-1, layer.router.dim)
            lo, hi = zbar.min(0).values, zbar.max(0).values
            layer.router.scale_min.copy_(lo)
            layer.router.scale_max.copy_(hi)
            pick = torch.randperm(len(zbar), generator=torch.Generator().manual_seed(i))[: layer.num_experts]
            layer.router.centroids.copy_((zbar[pick] - lo) / (hi - lo))
            if correction:
                layer.experts.correction.normal_(0, 0.1)
    return m


def write_topology(tmp: Path, model_path: str | Path, ports: dict[str, int], fallback: str = "fail",
                   name: str = "sites.yaml", *, coordinator: str = "cam", addresses: dict[str, str] | None = None,
                   placement: dict[int, dict[str, list[int]]] | None = None, rpc: dict[str, Any] | None = None,
                   site_extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A topology of sites on 127.0.0.1 (``addresses`` overrides a site's address, e.g. a proxy in front of it),
    one 20 Mbit/s link from the coordinator to each other site."""
    addresses = addresses or {}
    doc: dict[str, Any] = {
        "model": str(model_path), "coordinator": coordinator, "fallback": fallback,
        "sites": {n: {"address": addresses.get(n, f"127.0.0.1:{p}"), "device": dict(DEVICE),
                      **(site_extra or {}).get(n, {})} for n, p in ports.items()},
        "links": [{"between": [coordinator, n], "bandwidth_mbps": 20, "latency_ms": 4}
                  for n in ports if n != coordinator],
    }
    if placement is not None:
        doc["placement"] = placement
    if rpc is not None:
        doc["rpc"] = rpc
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump(doc))
    return path


def replicated_placement(layers: dict[int, int], sites: tuple[str, ...] = ("w0", "w1", "w2")
                         ) -> dict[int, dict[str, list[int]]]:
    """Expert e of every MoE layer (layer -> expert count) on sites[e mod n] and sites[(e+1) mod n]: two replicas."""
    n = len(sites)
    out: dict[int, dict[str, list[int]]] = {}
    for layer, count in layers.items():
        held: dict[str, list[int]] = {s: [] for s in sites}
        for e in range(count):
            held[sites[e % n]].append(e)
            held[sites[(e + 1) % n]].append(e)
        out[layer] = held
    return out
