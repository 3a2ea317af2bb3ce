"""Reading a model's routing: ``with record_routing(model) as rec:`` keeps, while the block runs, the routing of the
latest forward at every MoE layer; outside such a block nothing is kept (production forwards store nothing).

    with record_routing(model) as rec:
        model(x)
        idx_BNK = rec[8].expert_idx_BNK        # experts chosen at MoE layer 8, [B, N, k]
        load_E = rec.tokens_per_expert(8)      # patches (top-k slots) per expert, [E]

Built on forward hooks on each layer's :class:`moevit.moe.layer.RoutingTap`; the hooks are removed when the block
ends, also on an exception. Shapes follow the legend in :mod:`moevit.moe`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moevit.moe.layer import MoELayer, Routing

__all__ = ["RoutingRecord", "record_routing"]


class RoutingRecord:
    """The routing of the latest forward at each MoE layer (by ``layer_id``) of a :func:`record_routing` block."""

    def __init__(self, layers: dict[int, MoELayer]) -> None:
        self.layers = layers
        self.last: dict[int, Routing] = {}

    def __getitem__(self, layer_id: int) -> Routing:
        try:
            return self.last[layer_id]
        except KeyError:
            ran = sorted(self.last) or "none yet"
            raise KeyError(f"no routing recorded at MoE layer {layer_id} (recorded: {ran}; MoE layers: "
                           f"{sorted(self.layers)})") from None

    def __contains__(self, layer_id: object) -> bool:
        return layer_id in self.last

    def tokens_per_expert(self, layer_id: int) -> torch.Tensor:
        """Patches routed to each expert of ``layer_id`` in the latest forward (every top-k slot counts), [E]."""
        return torch.bincount(self[layer_id].expert_idx_BNK.reshape(-1), minlength=self.layers[layer_id].num_experts)

    def _store(self, layer_id: int, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor, probs_TE: torch.Tensor,
               batch: int) -> None:
        k = expert_idx_TK.shape[1]
        N = expert_idx_TK.shape[0] // batch
        self.last[layer_id] = Routing(expert_idx_TK.detach().reshape(batch, N, k),
                                      gates_TK.detach().reshape(batch, N, k), probs_TE.detach().reshape(batch, N, -1))


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Record the routing of ``model``'s MoE layers (a whole model, or one :class:`MoELayer`) while the block runs."""
    layers = {m.layer_id: m for m in model.modules() if isinstance(m, MoELayer)}
    rec = RoutingRecord(layers)
    handles = []
    try:
        for layer_id, layer in layers.items():
            def hook(_tap: nn.Module, args: tuple, _out: None, layer_id: int = layer_id) -> None:
                rec._store(layer_id, *args)

            handles.append(layer.tap.register_forward_hook(hook))
        yield rec
    finally:
        for h in handles:
            h.remove()
