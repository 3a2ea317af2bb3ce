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


def parse_layer_list(text: str) -> tuple[int, ...]:
    """``5,8`` -> (5, 8): transformer layer indices, as ``--skip-layers`` of moe-coordinator and moe-partition take
    them; ValueError naming what is wrong (the CLIs turn it into their usage error)."""
    try:
        layers = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of layer numbers, e.g. 5,8") from None
    if not layers or not all(0 <= i <= 8 for i in layers):
        raise ValueError(f"{text!r}: layers are numbered 0-8")
    return layers


__all__ = ["parse_layer_list", "skip_layers"]
