"""MobileViTV2 matches timm's model: keys, shapes, parameter and MAC counts (facts in tests/data), and input
handling as timm does it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moevit
from moevit.flops import count_macs, count_params

TIMM = json.loads((Path(__file__).parent / "data" / "timm_mobilevitv2.json").read_text())["models"]


@pytest.mark.parametrize("name", sorted(TIMM))
def test_state_dict_keys_and_shapes_are_timms(name):
    model = moevit.create_model(name, num_classes=1000)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, s) for k, s in TIMM[name]["state_dict"]]
    assert count_params(model) == TIMM[name]["parameters"]


def test_mobilevitv2_050_parameter_count():
    assert count_params(moevit.create_model("mobilevitv2_050")) == 1_370_593


@pytest.mark.parametrize("name", ["mobilevitv2_050", "mobilevitv2_100"])
def test_macs_match_timm(name):
    assert count_macs(moevit.create_model(name), 256) == TIMM[name]["macs_256"]


def test_timm_state_dict_loads_strict(dense_model):
    # a timm checkpoint is just a state_dict with these keys; one of ours stands in for it
    other = moevit.create_model("mobilevitv2_050", num_classes=10)
    other.load_state_dict(dense_model.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), dense_model(x))


@pytest.mark.parametrize("hw", [(256, 256), (250, 190), (97, 131)])
def test_odd_sizes_resize_to_the_patch_grid(dense_model, hw):
    with torch.no_grad():
        out = dense_model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_channels_last_gives_the_same_logits(dense_model):
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = dense_model(x)
        cl = dense_model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,word", [((3, 64, 64), "4-D"), ((1, 1, 64, 64), "channels"), ((1, 4, 64, 64), "3")])
def test_bad_input_is_a_clear_error(dense_model, shape, word):
    with pytest.raises(ValueError, match=word):
        dense_model(torch.randn(*shape))


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="mobilevitv2_050"):
        moevit.create_model("mobilevitv3_xxs")


def test_expert_width_cannot_exceed_dense_mlp():
    with pytest.raises(ValueError, match="exceeds"):
        moevit.create_model("mobilevitv2_050", moe=moevit.MoEConfig(layers=(0,), expert_hidden=129))


def test_transformer_layer_numbering():
    model = moevit.create_model("mobilevitv2_050")
    dims = [blk.norm1.num_channels for blk in model.transformer_layers()]
    assert dims == [64, 64, 96, 96, 96, 96, 128, 128, 128]


def test_logits_are_timms_stored_ones():
    """timm's own logits (bench/results/timm_reference.safetensors, made once with timm apart from the project) for
    weights drawn from the parameter names: moevit computes the same, and a changed weight would show."""
    from safetensors.torch import load_file

    from moevit.parity import reference_input, reference_weights

    stored = load_file(Path(__file__).parents[1] / "bench" / "results" / "timm_reference.safetensors")
    model = moevit.create_model("mobilevitv2_050").eval()
    weights = reference_weights(model)
    model.load_state_dict(weights, strict=True)
    x = reference_input(250, 190)
    with torch.no_grad():
        assert (model(x) - stored["mobilevitv2_050/250x190"]).abs().max() < 1e-4
        weights["stages.4.1.transformer.1.mlp.fc1.weight"] *= 1.1
        model.load_state_dict(weights, strict=True)
        assert (model(x) - stored["mobilevitv2_050/250x190"]).abs().max() > 1e-3
