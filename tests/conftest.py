"""Shared fixtures. Tests use data the project generates, sklearn's bundled digits, or files they write.

The suite runs in one process (no pytest-xdist): on the 2 cores it is sized for, most of its time is real worker,
coordinator and Classify-server processes starting and serving, which already use both cores, and many tests assert
latency bounds (health within 0.5 s, an answer within 2 s) that a second test stream on the same cores would break.
Time is saved instead by sharing processes that tests only call (module- and session-scoped fixtures), starting
processes together and running independent command-line checks side by side."""

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


SYNTH = "synthetic:classes=3,per_class=30,size=32"


@pytest.fixture(scope="session")
def trained_dense(tmp_path_factory):
    """A dense MobileViTV2-0.5 trained for a few seconds on synthetic data at 32 px, saved; (path, spec)."""
    from moevit.checkpoint import save_checkpoint
    from moevit.data import open_dataset
    from moevit.train import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    train = open_dataset(SYNTH, image_size=32, split="train", seed=0)
    model = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=3, image_size=32,
                                                  labels=tuple(train.classes)))
    Trainer(model, train, None, TrainConfig(epochs=4, batch_size=12, lr_rest=3e-3, lr_head=5e-3, seed=0), out,
            progress=False, log=lambda s: None).fit()
    return save_checkpoint(model.eval(), out / "dense.safetensors"), SYNTH


@pytest.fixture(scope="session")
def expert_model_path(tmp_path_factory):
    """A saved random MoE model (MoE layers 5 and 8, four experts each) for the worker transport tests."""
    from moevit.checkpoint import save_checkpoint
    from tests.deploy import small_moe_model

    model = small_moe_model((5, 8), num_experts=4, calib_size=64)
    return save_checkpoint(model, tmp_path_factory.mktemp("experts") / "moe.safetensors")


@pytest.fixture(scope="session")
def expert_worker(expert_model_path):
    """The address of a ``moe-worker`` process hosting every expert of ``expert_model_path``, shared by the transport
    tests that only call it (tests/test_packed.py, tests/test_wire_codecs.py): one start-up (seconds of imports)
    for the session instead of one per module and test."""
    from tests.netutil import free_port, start_worker, stop

    address = f"127.0.0.1:{free_port()}"
    proc = start_worker(str(expert_model_path), address)
    yield address
    stop(proc)


@pytest.fixture(scope="session")
def layer8_reference(expert_model_path):
    """(the in-process expert bank of layer 8, the model fingerprint) of ``expert_model_path``."""
    from moevit.checkpoint import load_checkpoint, model_fingerprint

    model = load_checkpoint(expert_model_path)
    return model.moe_layers()[8].experts, model_fingerprint(model)
