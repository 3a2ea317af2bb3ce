"""Token codecs on the wire between the coordinator and real workers: every codec's outputs against the in-process
experts (within the quantiser's bound both ways), fewer bytes, the codec negotiated from the worker's Info (an
older worker without a codec list keeps fp16, and is refused an int8 link at start with the site named), and
rpc.codec per site in a split run."""

from __future__ import annotations

import pytest
import torch
from moevit.coordinator.runtime import CoordinatorError, SplitRuntime
from moevit.deploy.topology import load_topology

from moevit.checkpoint import load_checkpoint
from moevit.fuse import folded_copy
from moevit_rpc.codecs import CODEC_NAMES
from tests.deploy import write_topology
from tests.netutil import free_port, in_process_worker, site_client

LAYER, DIM = 8, 128
# largest |error| of an expert output relative to the outputs' range, per base format: the input's quantisation
# passes through the expert (Lipschitz), the answer's adds half a scale
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2, "int8": 5e-2, "int4": 0.5}


# end to end through real worker/coordinator processes: make test runs it, make test-quick leaves it out
pytestmark = pytest.mark.e2e


@pytest.fixture
def worker(expert_worker):
    """A real worker process hosting every expert (the session's, see conftest.py), shared by the tests below (none
    alters it: codecs and skip rules are the client's choice per call)."""
    return expert_worker


def test_every_codec_round_trips_through_a_worker_in_fewer_bytes(worker, layer8_reference):
    bank, fp = layer8_reference
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [bank.forward_one(1, x), bank.forward_one(3, x[:7])]
    sent = {}
    info_codecs = None
    for name in CODEC_NAMES:
        client = site_client(worker, fp, wire=name)
        try:
            info_codecs = list(client.info().codecs)
            assert client.codec_problem(info_codecs) is None
            ys = client.start(LAYER, [(1, x), (3, x[:7])]).result()
            sent[name] = client.traffic.bytes_sent
        finally:
            client.close()
        base = name.partition("+")[0]
        for y, r in zip(ys, ref, strict=True):
            span = float(r.abs().max())
            assert float((y - r).abs().max()) <= TOLERANCE[base] * span, name
    assert "int8/1" in info_codecs and "zstd/1" in info_codecs
    # payload: fp16 half of fp32; int8 about a quarter (+ a float16 scale per token); int4 about an eighth
    assert 0.45 < sent["fp16"] / sent["fp32"] < 0.55
    assert 0.24 < sent["int8"] / sent["fp32"] < 0.30
    assert 0.13 < sent["int4"] / sent["fp32"] < 0.17
    assert sent["int8+zstd"] < sent["int8"] * 1.01  # never much worse than without the stage


def _as_older_worker(servicer) -> None:
    """A v1 worker from before token codecs: its Info lists none."""
    servicer._info.ClearField("codecs")


def _runtime(tmp_path, model_path, address, codec):
    topo = write_topology(tmp_path, model_path, {"cam": free_port(), "w": 1}, addresses={"w": address},
                          rpc={"codec": "fp16"}, site_extra={"w": {"rpc": {"codec": codec}}})
    return SplitRuntime.from_topology(load_topology(topo))


def test_an_older_worker_keeps_fp16_and_is_refused_int8_naming_the_site(expert_model_path, tmp_path):
    hosted = {5: [0, 1, 2, 3], 8: [0, 1, 2, 3]}
    with in_process_worker(expert_model_path, hosted, _as_older_worker) as address:
        rt = _runtime(tmp_path, expert_model_path, address, "int8+zstd")
        try:
            with pytest.raises(CoordinatorError) as err:
                rt.check_workers()
            text = str(err.value)
            assert f"site w ({address}) does not speak the codec 'int8+zstd'" in text
            assert "int8/1, zstd/1" in text and "an older worker" in text
        finally:
            rt.close()
        rt = _runtime(tmp_path, expert_model_path, address, "fp16")
        try:
            rt.check_workers()
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            res = rt.classify(x)
            assert rt.traffic()["w"]["calls"] > 0 and not res.degraded.any()
        finally:
            rt.close()


def test_split_runs_with_quantised_links_in_fewer_bytes(expert_model_path, worker, tmp_path):
    """rpc.codec per site in a whole split run: int8 keeps the logits close; int4 sends about a quarter of fp16's
    bytes (its accuracy on a trained model: bench/bench_wire.py; this random model's routing is too fragile)."""
    address = worker
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = folded_copy(load_checkpoint(expert_model_path))(x)
    sent, logits = {}, {}
    for codec in ("fp16", "int8", "int4+zstd"):
        rt = _runtime(tmp_path, expert_model_path, address, codec)
        try:
            rt.check_workers()
            assert rt.clients["w"].wire == codec
            logits[codec] = rt.classify(x).logits
            # per token: a quantised answer can move patches across routing boundaries of this random model,
            # which changes how many tokens later layers send (int8/fp16 in total bytes: 0.43 in one full run)
            sent[codec] = rt.traffic()["w"]["bytes_sent"] / rt.traffic()["w"]["tokens"]
        finally:
            rt.close()
    # a quantised layer-5 answer can move a patch across a layer-8 routing boundary of this random model, which
    # changes that image's logits wholesale: most images stay within the bound
    close = (logits["int8"] - ref).abs().amax(dim=1) <= 0.05 * float(ref.abs().max())
    assert int(close.sum()) >= 3, (logits["int8"], ref)
    assert torch.isfinite(logits["int4+zstd"]).all()
    assert 0.45 < sent["int8"] / sent["fp16"] < 0.6
    assert sent["int4+zstd"] / sent["fp16"] < 0.35


def test_skipped_patches_stay_off_the_wire_and_are_recorded(expert_model_path, worker, tmp_path):
    """A skip rule in the coordinator: with every remote patch under the threshold nothing is sent; the local copy
    gives the unskipped logits, the residual path others; SplitRuntime.skipped() records the counts per layer."""
    from moevit.moe.skip import SkipRule

    address = worker
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = folded_copy(load_checkpoint(expert_model_path))(x)
    topo = write_topology(tmp_path, expert_model_path, {"cam": free_port(), "w": 1}, addresses={"w": address})
    for action in ("local", "residual"):
        rt = SplitRuntime.from_topology(load_topology(topo), wire="fp32", skip=SkipRule(threshold=1.0,
                                                                                         action=action))
        try:
            rt.check_workers()
            logits = rt.classify(x).logits
            assert rt.traffic()["w"]["calls"] == 0
            skipped = rt.skipped()
            assert set(skipped) == {5, 8} and all(s["sent"] == 0 for s in skipped.values())
            assert sum(s[f"offwire_{action}"] for s in skipped.values()) > 0
            if action == "local":
                torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
            else:
                assert not torch.allclose(logits, ref, atol=1e-3)
        finally:
            rt.close()
    rt = SplitRuntime.from_topology(load_topology(topo), wire="fp32", skip=SkipRule(threshold=0.0))
    try:
        rt.check_workers()  # the worker's health must be known before its experts are called
        rt.classify(x)
        assert rt.traffic()["w"]["calls"] > 0 and rt.skipped() == {}  # an inactive rule wraps nothing
    finally:
        rt.close()


def test_a_rule_for_some_layers_leaves_the_others_on_the_wire(expert_model_path, worker, tmp_path):
    """``--skip-layers 8``: layer 8's remote patches stay off the wire, layer 5 sends all of its own; a rule naming a
    layer that is not an MoE layer of the model is refused at start, naming it."""
    from moevit.moe.skip import rules_from_options
    from moevit.offwire import parse_layer_list

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # every expert on the worker: every patch of both layers is remote, whichever experts it routes to (placed by the
    # partitioner, layer 8's two patches went to the camera's experts on one fresh install)
    every = {layer: {"w": [0, 1, 2, 3]} for layer in (5, 8)}
    topo = write_topology(tmp_path, expert_model_path, {"cam": free_port(), "w": 1}, addresses={"w": worker},
                          placement=every)
    # capacity 0: every remote patch of layer 8 stays off the wire (a threshold of 1.0 keeps back only patches under
    # it, and a saturated router's top-1 probability is 1.0 exactly: the session's random model sent 2 of 2)
    rules = rules_from_options(threshold=1.0, capacity=0, layers=parse_layer_list("8"))
    rt = SplitRuntime.from_topology(load_topology(topo), wire="fp32", skip=rules)
    try:
        rt.check_workers()
        rt.classify(x)
        skipped = rt.skipped()
        assert set(skipped) == {8} and skipped[8]["sent"] == 0 and skipped[8]["offwire_residual"] > 0
        assert rt.traffic()["w"]["calls"] > 0  # layer 5 still calls the worker
    finally:
        rt.close()
    with pytest.raises(CoordinatorError, match=r"layer\(s\) 3, which are not MoE layers .*MoE layers: 5, 8"):
        SplitRuntime.from_topology(load_topology(topo), wire="fp32", skip=rules_from_options(threshold=1.0,
                                                                                          layers=(3, 8)))
    for bad in ("x", "9", ""):
        with pytest.raises(ValueError, match="layer"):
            parse_layer_list(bad)
