"""moe-sim --emulate end to end: real workers on loopback behind shaped link proxies, the in-process coordinator,
and the simulator's prediction of the same images."""

from __future__ import annotations

import json

import pytest
import yaml
from moevit.sim.cli import main

from moevit.checkpoint import save_checkpoint
from tests.deploy import small_moe_model

SYNTH = "synthetic:classes=3,per_class=20,size=64"


def _model():
    """A small MoE model (layers 1, 5, 8; 4 experts) whose routers spread real patches over every expert."""
    return small_moe_model(num_experts=4, num_classes=3, image_size=64, calib_size=64, correction=False)


@pytest.mark.slow
def test_emulation_compares_measured_and_simulated_latency(tmp_path, capsys):
    model = save_checkpoint(_model(), tmp_path / "moe.safetensors")
    topo = yaml.safe_load(open("examples/sites.yaml"))
    topo["model"] = str(model)
    (tmp_path / "sites.yaml").write_text(yaml.safe_dump(topo))
    out = tmp_path / "emu"
    rc = main(["--emulate", "--topology", str(tmp_path / "sites.yaml"), "--data", SYNTH, "--out", str(out),
               "--images", "12", "--bandwidth-mbps", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((out / "emulation.json").read_text())
    checks = {c["strategy"]: c for c in report["checks"]}
    assert set(checks) == {"split", "local-moe"}
    split = checks["split"]
    # Bytes are protocol arithmetic: they must agree closely. Time is measured on a shared machine: the 10 % target
    # is checked by the benchmark on a quiet one; here a wide band only catches a broken model.
    assert split["simulated_bytes_per_image"] == pytest.approx(split["measured_bytes_per_image"], rel=0.05)
    assert abs(split["rel_error"]) < 0.3
    # the 2 Mbit/s links dominate (~8x on a quiet machine); a loaded machine slows local compute more than the wire
    assert split["measured_mean_ms"] > 2 * checks["local-moe"]["measured_mean_ms"]
    assert "split" in text and "local-moe" in text
