"""The per-patch MoE layer: exactness against the dense MLP, routing arithmetic by hand, gradients, exposure."""

from __future__ import annotations

import math

import pytest
import torch

import moevit
from moevit.moe import CosineRouter, LocalDispatcher, MoELayer, record_routing
from moevit.moefy import load_expert, moe_skeleton


def _dense_equivalent(dense, layers):
    """E = 1, K = full width, zero correction: must be the dense model."""
    hidden = {i: dense.transformer_layers()[i].mlp.fc1.out_channels for i in layers}
    assert len(set(hidden.values())) == 1
    moe = moe_skeleton(dense, moevit.MoEConfig(layers=layers, num_experts=1, expert_hidden=hidden[layers[0]]))
    for i, layer in moe.moe_layers().items():
        blk = dense.transformer_layers()[i]
        load_expert(layer.experts, 0, blk, blk.mlp, torch.arange(hidden[i]))
    return moe.eval()


@pytest.mark.parametrize("layers", [(8,), (6, 7, 8), (2, 3, 4, 5)])
def test_one_full_expert_reproduces_the_dense_model(dense_model, layers):
    moe = _dense_equivalent(dense_model, layers)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_model(x), atol=1e-5, rtol=0)


def test_router_logits_by_hand():
    # C = 2, E = 2; scaler maps [0, 2] -> [0, 1]; centroids (1, 0) and (0, 1) in scaled space.
    r = CosineRouter(2, 2, logit_scale=10.0)
    with torch.no_grad():
        r.scale_min.copy_(torch.tensor([0.0, 0.0]))
        r.scale_max.copy_(torch.tensor([2.0, 2.0]))
        r.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # token (2, 0) scales to (1, 0): cos = (1, 0) -> logits (10, 0); token (1, 1) -> (0.5, 0.5): cos = 1/√2 each
    logits = r(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0], [10 / math.sqrt(2), 10 / math.sqrt(2)]]))


def _tiny_layer(top_k, gate):
    # dim 2, 3 experts whose output is a constant vector (zero weights, bias b_e): y = Σ g_e b_e is easy to check
    layer = MoELayer(2, layer_id=0, num_experts=3, expert_hidden=1, top_k=top_k, gate=gate, logit_scale=1.0)
    with torch.no_grad():
        layer.router.scale_min.zero_()
        layer.router.scale_max.fill_(1.0)
        layer.router.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.experts.fc1_weight.zero_()
        layer.experts.fc1_bias.zero_()
        layer.experts.fc2_weight.zero_()
        layer.experts.fc2_bias.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]]))
        layer.experts.alpha.zero_()
    return layer


def _one_patch(v):
    # one image, C = 2, P = 4 pixels all equal to v, N = 1 patch
    return torch.tensor(v).reshape(1, 2, 1, 1).expand(1, 2, 4, 1).contiguous()


def test_top1_renorm_gate_is_one_and_picks_the_nearest_centroid():
    layer = _tiny_layer(1, "renorm")
    z = _one_patch([1.0, 0.0])  # cos: e0 = 1, e1 = 0, e2 = 1/√2 -> e0
    with record_routing(layer) as rec:
        y = layer(z, z)
    assert rec[0].expert_idx_BNK.tolist() == [[[0]]]
    assert rec[0].gates_BNK.item() == 1.0
    torch.testing.assert_close(y, torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).expand(1, 2, 4, 1))


def test_top2_softmax_gates_by_hand():
    layer = _tiny_layer(2, "softmax")
    z = _one_patch([1.0, 0.0])
    c = 1 / math.sqrt(2)
    p = torch.softmax(torch.tensor([1.0, 0.0, c]), 0)  # logits = cos × 1
    with record_routing(layer) as rec:
        y = layer(z, z)
    assert rec[0].expert_idx_BNK.tolist() == [[[0, 2]]]
    expected = p[0] * torch.tensor([1.0, 0.0]) + p[2] * torch.tensor([10.0, 10.0])
    torch.testing.assert_close(y[0, :, 0, 0], expected)
    # renormalised top-2: gates p0/(p0+p2), p2/(p0+p2)
    layer.gate = "renorm"
    y = layer(z, z)
    g = p[[0, 2]] / p[[0, 2]].sum()
    torch.testing.assert_close(y[0, :, 0, 0], g[0] * torch.tensor([1.0, 0.0]) + g[1] * torch.tensor([10.0, 10.0]))


def test_all_pixels_of_a_patch_share_one_expert():
    layer = MoELayer(8, layer_id=0, num_experts=4, expert_hidden=4)
    z = torch.randn(2, 8, 4, 5)
    with record_routing(layer) as rec:
        layer(z, z)
    assert rec[0].expert_idx_BNK.shape == (2, 5, 1)
    assert int(rec.tokens_per_expert(0).sum()) == 10


def test_routing_is_kept_only_inside_a_record_routing_block():
    layer = MoELayer(8, layer_id=3, num_experts=4, expert_hidden=4)
    z = torch.randn(2, 8, 4, 5)
    with record_routing(layer) as rec:
        with pytest.raises(KeyError, match="no routing recorded at MoE layer 3"):
            rec[3]
        layer(z, z)
        first = rec[3]
        layer(z[:1], z[:1])  # the latest forward replaces the previous one
        assert rec[3].probs_BNE.shape == (1, 5, 4) and first.probs_BNE.shape == (2, 5, 4)
        assert rec[3].probs_BNE.sum(-1) == pytest.approx(torch.ones(1, 5))
    assert not layer.tap._forward_hooks  # the hooks are gone with the block
    layer(z, z)
    assert rec[3].probs_BNE.shape == (1, 5, 4)  # a forward outside the block records nothing
    with pytest.raises(RuntimeError), record_routing(layer):
        raise RuntimeError("boom")
    assert not layer.tap._forward_hooks  # removed on an exception too


def test_gradients_reach_router_experts_and_correction():
    torch.manual_seed(0)
    for gate in ("renorm", "softmax"):
        layer = MoELayer(8, layer_id=0, num_experts=4, expert_hidden=4, gate=gate)
        with torch.no_grad():
            layer.experts.correction.normal_()
        z = torch.randn(2, 8, 4, 16)
        layer(z, z).pow(2).sum().backward()
        for name in ("router.logit_scale", "router.centroids", "experts.fc1_weight", "experts.fc2_weight",
                     "experts.correction", "experts.alpha", "experts.norm_weight"):
            g = layer.get_parameter(name).grad
            assert g is not None and g.abs().sum() > 0, f"{gate}: no gradient reaches {name}"


def test_dispatcher_is_swappable_without_touching_the_model(dense_model):
    moe = _dense_equivalent(dense_model, (8,))
    calls = []

    class Recording(LocalDispatcher):
        def compute(self, layer_id, plan):
            calls.append((layer_id, plan.experts, plan.counts))
            return super().compute(layer_id, plan)

    layer = moe.moe_layers()[8]
    layer.set_dispatcher(Recording(layer.experts))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        moe(x)
    # 64 px input -> 2x2 feature map at stage 4 -> 1 patch of 4 pixels per image, 2 images, 1 expert
    assert calls == [(8, [0], [2])]


def test_expert_subset_computes_the_same():
    layer = MoELayer(8, layer_id=3, num_experts=6, expert_hidden=4)
    sub = layer.experts.subset([1, 4])
    x = torch.randn(10, 8)
    torch.testing.assert_close(sub.forward_one(4, x), layer.experts.forward_one(4, x))
    with pytest.raises(KeyError, match="not in this bank"):
        sub.forward_one(2, x)
