"""BatchNorm folding for deployment: the folded model computes what the trainable one does."""

from __future__ import annotations

import copy

import pytest
import torch

import moevit
from moevit.fuse import fold_batchnorm, folded_copy
from moevit.layers import ConvNormAct


def _dense_with_trained_looking_norms() -> moevit.MobileViTV2:
    """A dense model (no routing, so no boundary flips) whose BatchNorms are far from identity."""
    torch.manual_seed(0)
    model = moevit.create_model("mobilevitv2_050", num_classes=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model.eval()


def test_folded_model_gives_the_same_logits_without_batchnorms():
    model = _dense_with_trained_looking_norms()
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    assert n == sum(isinstance(m, ConvNormAct) for m in model.modules()) > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert fold_batchnorm(folded) == 0  # idempotent


def test_folding_a_model_in_training_mode_is_refused():
    model = moevit.create_model("mobilevitv2_050", num_classes=3).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_folded_copy_leaves_the_model_as_it_was():
    model = _dense_with_trained_looking_norms()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = folded_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
