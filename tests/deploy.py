"""Small seeded MoE models and topology files for tests that run split deployments on loopback (the harness of
:mod:`moevit.coordinator.local`, which the benchmarks and the emulation share)."""

from __future__ import annotations

from moevit.coordinator.local import DEVICE, replicated_placement, small_moe_model, write_topology

__all__ = ["DEVICE", "replicated_placement", "small_moe_model", "write_topology"]
