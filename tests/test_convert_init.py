"""Router initialisation choices of the conversion (issue 17, item 6): ward is today's conversion unchanged, every
other choice gives a working MoE with its own centroids, the linear router learns, bad values are refused."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moevit
from moevit.checkpoint import load_checkpoint, read_file, save_checkpoint
from moevit.convert import ROUTER_INITS, ConvertConfig, class_mean_clusters, convert, random_centroids
from moevit.data import open_dataset
from moevit.moe.router import CosineRouter, LinearRouter

SYNTH = "synthetic:classes=3,per_class=30,size=32"


def _open(spec):
    return functools.lru_cache(maxsize=None)(lambda s: open_dataset(spec, image_size=s, split="train", seed=0))


def _convert(dense, spec, *, experts=4, router_init=None, router="cosine", units="overlap-topk", seed=0,
             layers=(2, 8)):
    """``router_init`` None: the config's default, as a conversion that does not name one gets."""
    open_at = _open(spec)
    chosen = {} if router_init is None else {"router_init": router_init}
    cfg = ConvertConfig(moe=moevit.MoEConfig(layers=layers, num_experts=experts, expert_hidden=16, router=router),
                        images_per_class=8, units=units, seed=seed, **chosen)
    return convert(dense, open_at, list(open_at(32).targets), cfg)


def _state_hash(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("units", ["overlap-topk", "disjoint-balanced"])
def test_ward_is_the_default_conversion_bit_for_bit(units):
    # Ward is what a conversion that does not name a router init gets, bit for bit, every time. (This compared
    # sha256 hashes taken at commit 36532be, before --router-init existed; on a fresh install of 2026-12-02 those
    # hashes changed at that very commit as well: they depend on the machine and the libraries, not only this code.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dense = moevit.build_model(moevit.ModelConfig(arch="mobilevitv2_050", num_classes=3, image_size=32)).eval()
        moe, report = _convert(dense, SYNTH, units=units, router_init="ward")
        default, _ = _convert(dense, SYNTH, units=units)
        again, _ = _convert(dense, SYNTH, units=units, router_init="ward")
    finally:
        torch.set_num_threads(threads)
    assert ConvertConfig(moe=moevit.MoEConfig(layers=(8,))).router_init == "ward"
    assert _state_hash(moe) == _state_hash(default) == _state_hash(again)
    assert report["layers"]["8"]["router_init"] == "ward" and "router" not in moe.config.moe.to_dict()


@pytest.mark.parametrize("router_init", [*ROUTER_INITS, "linear"])
def test_every_init_gives_a_working_moe(trained_dense, tmp_path, router_init):
    path, spec = trained_dense
    dense = load_checkpoint(path)
    router = "linear" if router_init == "linear" else "cosine"
    moe, report = _convert(dense, spec, router_init="ward" if router == "linear" else router_init, router=router)
    x = torch.stack([_open(spec)(32)[i][0] for i in range(6)])
    with torch.no_grad():
        out = moe(x)
    assert out.shape == (6, 3) and torch.isfinite(out).all()
    for rep in report["layers"].values():
        assert len(rep["cluster_sizes"]) == 4 and min(rep["cluster_sizes"]) >= 1
        assert sum(rep["cluster_sizes"]) == rep["representative_patches"]
        assert rep["router"] == router
    back = load_checkpoint(save_checkpoint(moe, tmp_path / "m.safetensors"))
    kind = LinearRouter if router == "linear" else CosineRouter
    assert all(isinstance(layer.router, kind) for layer in back.moe_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(back(x), out, atol=0, rtol=0)


def test_kmeans_and_random_set_other_centroids_than_ward(trained_dense):
    path, spec = trained_dense
    dense = load_checkpoint(path)
    cent = {r: _convert(dense, spec, router_init=r, layers=(8,))[0].moe_layers()[8].router.centroids.detach()
            for r in ("ward", "kmeans", "random")}
    assert not torch.equal(cent["kmeans"], cent["ward"])
    assert not torch.equal(cent["random"], cent["ward"])
    # seeded: the same seed draws the same patches, another seed others
    again = _convert(dense, spec, router_init="random", layers=(8,))[0].moe_layers()[8].router.centroids.detach()
    other = _convert(dense, spec, router_init="random", seed=1, layers=(8,))[0].moe_layers()[8].router.centroids
    other = other.detach()
    assert torch.equal(again, cent["random"]) and not torch.equal(other, cent["random"])


def test_random_centroids_are_drawn_patches_and_own_their_cluster():
    points = np.random.default_rng(0).uniform(size=(50, 8))
    labels, drawn = random_centroids(points, 5, np.random.default_rng(3))
    assert len(set(drawn.tolist())) == 5
    assert labels[drawn].tolist() == [0, 1, 2, 3, 4]
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    others = np.setdiff1d(np.arange(50), drawn)
    assert (labels[others] == (unit[others] @ unit[drawn].T).argmax(axis=1)).all()  # the router's own choice


def test_class_means_group_classes_by_the_rule_the_help_states():
    rng = np.random.default_rng(0)
    # classes 0 and 1 close together, class 2 far away: with 2 experts 0 and 1 share one
    centers = np.array([[0.0] * 4, [0.1] * 4, [5.0] * 4])
    classes = np.repeat(np.arange(3), 10)
    points = centers[classes] + rng.normal(0, 0.01, size=(30, 4))
    labels, owners = class_mean_clusters(points, classes, 3, seed=0)
    assert owners == [[0], [1], [2]] and (labels == classes).all()
    labels, owners = class_mean_clusters(points, classes, 2, seed=0)
    assert sorted(owners) == [[0, 1], [2]]
    labels, owners = class_mean_clusters(points, classes, 5, seed=0)  # E > C: classes 0 and 1 get two experts each
    assert owners == [[0], [0], [1], [1], [2]]
    assert set(labels[classes == 0]) == {0, 1} and set(labels[classes == 2]) == {4}


@pytest.mark.parametrize("kwargs,message", [
    ({"router_init": "kmean"}, "router_init must be one of ('ward', 'kmeans', 'class-means', 'random'), got 'kmean'"),
    ({"units": "disjoint"}, "units must be one of"),
    ({"patches_per_class": 0}, "patches_per_class must be >= 1, got 0"),
    ({"size_min": 128, "size_max": 96}, "conversion sizes 128-96"),
])
def test_bad_conversion_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConvertConfig(**kwargs)


def test_bad_router_is_refused():
    with pytest.raises(ValueError, match=r"MoEConfig.router must be one of \('cosine', 'linear'\), got 'mlp'"):
        moevit.MoEConfig(router="mlp")


def test_linear_router_is_seeded_and_learns(trained_dense):
    from moevit.train import TrainConfig, param_groups

    path, spec = trained_dense
    dense = load_checkpoint(path)
    a, _ = _convert(dense, spec, router="linear", layers=(8,))
    b, _ = _convert(dense, spec, router="linear", layers=(8,))
    wa, wb = a.moe_layers()[8].router.linear.weight, b.moe_layers()[8].router.linear.weight
    assert torch.equal(wa, wb)
    assert {id(p) for p in a.moe_layers()[8].router.parameters()} <= \
        {id(p) for g in param_groups(a, TrainConfig()) if g["name"] == "moe" for p in g["params"]}
    x = torch.stack([_open(spec)(32)[i][0] for i in range(6)])
    a.train()
    a(x).logsumexp(dim=1).sum().backward()
    assert wa.grad is not None and wa.grad.abs().sum() > 0  # the renormalised top-1 gate passes d log p to it


@pytest.mark.slow
def test_cli_records_the_choice_in_report_and_checkpoint(trained_dense, tmp_path):
    path, spec = trained_dense
    r = subprocess.run([sys.executable, "-m", "moevit.cli.convert", "--dense", str(path), "--data", spec,
                        "--layers", "8", "--experts", "2", "--hidden", "16", "--images-per-class", "6",
                        "--router-init", "class-means", "--router", "linear", "--sizes", "32:32",
                        "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["router_init"] == "class-means" and report["router"] == "linear" and report["sizes"] == [32]
    assert sorted(c for g in report["layers"]["8"]["expert_classes"] for c in g) == [0, 1, 2]
    meta = json.loads(read_file(tmp_path / "m.safetensors")[1]["conversion"])
    assert meta["router_init"] == "class-means" and meta["router"] == "linear" and meta["units"] == "overlap-topk"
    bad = subprocess.run([sys.executable, "-m", "moevit.cli.convert", "--dense", str(path), "--data", spec,
                          "--router-init", "centroid", "--out", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--router-init: invalid choice: 'centroid'" in bad.stderr, bad.stderr
