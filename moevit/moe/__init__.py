"""Per-patch mixture-of-experts layer: router, experts, dispatcher and the layer that joins them.

Shape-suffix legend used in this package:
  B batch, C channels (model dim), P pixels per patch, N patches per image,
  T patch tokens (B*N), E experts, K top-k slots (or expert hidden units in weights),
  S assignments sorted by expert (T*k), H expert hidden units.
"""

from moevit.moe.dispatcher import Dispatcher, DispatchPlan, LocalDispatcher
from moevit.moe.experts import ExpertBank
from moevit.moe.layer import MoELayer, Routing, RoutingTap
from moevit.moe.router import CosineRouter, LinearRouter
from moevit.moe.routing import RoutingRecord, record_routing

__all__ = ["CosineRouter", "DispatchPlan", "Dispatcher", "ExpertBank", "LinearRouter", "LocalDispatcher", "MoELayer",
           "Routing", "RoutingRecord", "RoutingTap", "record_routing"]
