"""Checkpoints: bit-exact round trip, rebuilt from the file alone, and clear refusals of bad files."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import moevit
from moevit.checkpoint import CheckpointError, load_checkpoint, load_weights, model_fingerprint, save_checkpoint


@pytest.fixture
def moe_model():
    torch.manual_seed(1)
    cfg = moevit.MoEConfig(layers=(1, 5, 8), num_experts=4, expert_hidden=32, top_k=2, correction="paper")
    return moevit.create_model("mobilevitv2_050", num_classes=7, moe=cfg, labels=list("abcdefg")).eval()


def test_round_trip_is_bit_exact(tmp_path, moe_model):
    path = save_checkpoint(moe_model, tmp_path / "m.safetensors")
    back = load_checkpoint(path)
    assert back.config == moe_model.config
    for (k, a), (k2, b) in zip(moe_model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(back(x), moe_model(x))
    assert model_fingerprint(back) == model_fingerprint(moe_model)


def test_fingerprint_changes_with_any_weight(moe_model):
    before = model_fingerprint(moe_model)
    with torch.no_grad():
        moe_model.moe_layers()[8].experts.correction[0, 0] += 1e-3
    assert model_fingerprint(moe_model) != before


def test_truncated_file_is_refused(tmp_path, moe_model):
    path = save_checkpoint(moe_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*(truncated|corrupt)"):
        load_checkpoint(path)


def test_flipped_weight_bytes_fail_the_fingerprint(tmp_path, moe_model):
    path = save_checkpoint(moe_model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="refused.*weights_only"):
        load_weights(moevit.create_model("mobilevitv2_050"), path)


def test_plain_tensor_pickle_loads_with_weights_only(tmp_path, dense_model):
    path = tmp_path / "dense.pth"
    torch.save(dense_model.state_dict(), path)
    fresh = moevit.create_model("mobilevitv2_050", num_classes=10)
    load_weights(fresh, path)
    assert torch.equal(fresh.state_dict()["head.fc.weight"], dense_model.state_dict()["head.fc.weight"])


def test_timm_style_file_loads_and_new_head_is_allowed(tmp_path):
    timm_like = moevit.create_model("mobilevitv2_050", num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_like.state_dict().items()}, str(path))  # no moevit metadata
    with pytest.raises(CheckpointError, match="no moevit config"):
        load_checkpoint(path)
    ours = moevit.create_model("mobilevitv2_050", num_classes=10)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(ours, path)
    assert load_weights(ours, path, new_head=True) == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(ours.state_dict()["stem.conv.weight"], timm_like.state_dict()["stem.conv.weight"])


def test_wrong_architecture_is_named(tmp_path):
    path = save_checkpoint(moevit.create_model("mobilevitv2_075", num_classes=3), tmp_path / "m075.safetensors")
    with pytest.raises(CheckpointError, match=r"m075\.safetensors.*mobilevitv2_050.*shape"):
        load_weights(moevit.create_model("mobilevitv2_050", num_classes=3), path)


def test_unknown_architecture_in_metadata(tmp_path, dense_model):
    path = tmp_path / "x.safetensors"
    state = {k: v.contiguous() for k, v in dense_model.state_dict().items()}
    save_file(state, str(path), metadata={"config": '{"arch": "resnet50", "num_classes": 10}'})
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet50'"):
        load_checkpoint(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_moevit_info_prints_parameters_macs_and_experts(tmp_path, moe_model):
    path = save_checkpoint(moe_model, tmp_path / "m.safetensors")
    out = subprocess.run([sys.executable, "-m", "moevit.cli.info", str(path), "--image-size", "128"],
                         capture_output=True, text=True, check=True).stdout
    assert "parameters" in out and "MACs/image" in out
    assert "layers [1, 5, 8], top-2" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split()[:1] in (["1"], ["5"], ["8"])]
    assert [r[:4] for r in rows] == [["1", "64", "4", "32"], ["5", "96", "4", "32"], ["8", "128", "4", "32"]]
    bad = subprocess.run([sys.executable, "-m", "moevit.cli.info", str(tmp_path / "none.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr
