"""Which MoE layers a background-skip rule applies at: the one answer the coordinator's rules
(:mod:`moevit.moe.skip`, ``moe-coordinator --skip-layers``), the simulator (``settings.skip_layers``) and the cost
model (:func:`moevit.partition.placement.skip_fractions`) share. No torch here, so the cost model stays numpy only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


def skip_layers(layers: Collection[int] | None, moe_layers: Iterable[int]) -> frozenset[int]:
    """The MoE layers (of ``moe_layers``) where a skip rule applies: those in ``layers``, every one when ``layers``
    is None (the default of ``moe-coordinator --skip-layers`` and of the simulator's ``settings.skip_layers``); at the
    others every remote patch travels. ValueError naming the layer(s) of ``layers`` that are not MoE layers."""
    moe = frozenset(int(i) for i in moe_layers)
    if layers is None:
        return moe
    chosen = frozenset(int(i) for i in layers)
    if stray := sorted(chosen - moe):
        raise ValueError(f"layer(s) {', '.join(map(str, stray))} not MoE layers (the MoE layers: "
                         f"{', '.join(map(str, sorted(moe)))})")
    return chosen


__all__ = ["skip_layers"]
