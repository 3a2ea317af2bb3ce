"""Background skipping (moevit.moe.skip): the rule by hand, and the dispatcher that applies it to a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moevit.moe.dispatcher import Dispatcher
from moevit.moe.skip import SkippingDispatcher, SkipRule, apply_skip, rules_per_layer, subset_plan
from tests.deploy import small_moe_model

EXPERTS = np.array([0, 1, 2, 3, 1])
CONF = np.array([0.2, 0.9, 0.4, 0.6, 0.3])


def test_rule_by_hand():
    assert not SkipRule().offwire(EXPERTS, CONF).any()
    assert list(SkipRule(threshold=0.5).offwire(EXPERTS, CONF)) == [True, False, True, False, True]
    bg = SkipRule(threshold=0.5, background={1})
    assert list(bg.offwire(EXPERTS, CONF)) == [True, True, True, False, True]  # any: low confidence or background
    both = SkipRule(threshold=0.5, background={1}, match="all")
    assert list(both.offwire(EXPERTS, CONF)) == [False, False, False, False, True]  # low-confidence background only
    # patches of experts that stay on the camera never travel, so the rule leaves them alone
    assert list(SkipRule(threshold=0.5).offwire(EXPERTS, CONF, remote={0, 1})) == [True, False, False, False, True]


def test_capacity_keeps_the_most_confident_remote_patches_per_image():
    rule = SkipRule(capacity=1)
    image = np.array([0, 0, 0, 1, 1])
    assert list(rule.offwire(EXPERTS, CONF, image=image)) == [True, False, True, False, True]
    # with a threshold first: what is left competes for the capacity
    rule = SkipRule(threshold=0.35, capacity=1)
    assert list(rule.offwire(EXPERTS, CONF, image=image)) == [True, False, True, False, True]
    assert list(SkipRule(capacity=0).offwire(EXPERTS, CONF, remote={2})) == [False, False, True, False, False]


@pytest.mark.parametrize("bad", [dict(threshold=1.5), dict(action="drop"), dict(match="some"), dict(capacity=-1)])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ValueError, match="skip"):
        SkipRule(**bad)


@pytest.fixture(scope="module")
def model():
    return small_moe_model((1, 5, 8)).eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _unwrap(model):
    for layer in model.moe_layers().values():
        layer.set_dispatcher(None)


def test_local_action_computes_the_same_outputs_and_counts_what_stayed_off_the_wire(model):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = _logits(model, x)
    wrappers = apply_skip(model, {layer: SkipRule(threshold=0.9, action="local") for layer in (1, 5, 8)})
    try:
        out = _logits(model, x)
    finally:
        _unwrap(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # the local copy is the same expert
    counts = [w.counts for w in wrappers.values()]
    assert sum(c.offwire_local for c in counts) > 0 and sum(c.offwire_residual for c in counts) == 0
    # every patch of every layer (64 px: 16, 4 and 1 patches per image at layers 1, 5 and 8) counted once
    assert sum(c.sent + c.offwire_local for c in counts) == 3 * (16 + 4 + 1)


class _Zero(Dispatcher):
    """Every expert output zero: the model with its MoE layers passing through the residual path."""

    def compute(self, layer_id, plan):
        P, C = plan.x_SPC.shape[1:]
        return [plan.x_SPC.new_zeros(n * P, C) for n in plan.counts]


def test_residual_action_leaves_the_patches_to_the_residual_path(model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for layer in model.moe_layers().values():
        layer.set_dispatcher(_Zero())
    try:
        zero = _logits(model, x)
    finally:
        _unwrap(model)
    apply_skip(model, {layer: SkipRule(threshold=1.0) for layer in (1, 5, 8)})  # every patch (p < 1) off the wire
    try:
        out = _logits(model, x)
    finally:
        _unwrap(model)
    torch.testing.assert_close(out, zero, atol=1e-6, rtol=0)
    assert not torch.allclose(out, _logits(model, x))


def test_only_remote_experts_and_the_wrapped_dispatcher_sees_the_rest(model):
    seen = []

    class _Spy(Dispatcher):
        def compute(self, layer_id, plan):
            seen.append(list(plan.experts))
            return [torch.zeros(n * plan.x_SPC.shape[1], plan.x_SPC.shape[2]) for n in plan.counts]

    layer = model.moe_layers()[8]
    layer.set_dispatcher(SkippingDispatcher(_Spy(), SkipRule(threshold=1.0), remote={0, 1, 2, 3}))
    try:
        _logits(model, torch.randn(2, 3, 64, 64))
    finally:
        layer.set_dispatcher(None)
    assert seen and all(e >= 4 for experts in seen for e in experts)  # experts 0-3 were all skipped


def test_subset_plan_keeps_the_expert_grouping(model):
    layer = model.moe_layers()[5]
    x = torch.randn(10, 4, layer.experts.dim)
    idx = torch.tensor([[3], [1], [3], [0], [1], [1], [2], [0], [3], [2]])
    plan = layer.dispatcher.dispatch(x, idx, torch.rand(10, layer.num_experts))
    mask = torch.tensor([True, False] * 5)
    sub = subset_plan(plan, mask)
    assert sum(sub.counts) == 5 and sub.experts == sorted(sub.experts)
    torch.testing.assert_close(sub.x_SPC, plan.x_SPC[mask])


def test_one_rule_applies_at_every_moe_layer_and_a_stray_layer_is_named():
    rule = SkipRule(threshold=0.3)
    assert rules_per_layer(rule, [1, 5, 8]) == {1: rule, 5: rule, 8: rule}
    assert rules_per_layer({5: rule}, [1, 5, 8]) == {5: rule}  # layers 1 and 8 send every patch
    assert rules_per_layer(None, [8]) == {}
    with pytest.raises(ValueError, match=r"layer\(s\) 3 not MoE layers \(the MoE layers: 1, 5, 8\)"):
        rules_per_layer({3: rule, 5: rule}, [1, 5, 8])
