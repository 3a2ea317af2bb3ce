"""Shared fixtures. Tests use data the project generates, sklearn's bundled digits, or files they write."""

from __future__ import annotations

import pytest
import torch

import moevit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def dense_model():
    """A small-class MobileViTV2-0.5 with randomised norm affines so equality checks are not trivial."""
    torch.manual_seed(0)
    model = moevit.create_model("mobilevitv2_050", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()
