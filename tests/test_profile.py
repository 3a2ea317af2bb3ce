"""Routing statistics (partition/profile.py, moe-profile) on a tiny random MoE model and synthetic images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from moevit.partition.cli import partition_main, profile_main
from moevit.partition.costmodel import load_stats, parse_stats
from moevit.partition.profile import profile_model, select_images

import moevit
from moevit.analysis import ClassAffinity, routing_by_class
from moevit.checkpoint import model_fingerprint, save_checkpoint
from moevit.checkpoint_meta import checkpoint_fingerprint
from moevit.data import open_dataset
from moevit.flops import count_macs
from moevit.moe.routing import record_routing

DATA = "synthetic:classes=3,per_class=6,size=64"


def tiny_model(top_k: int = 1) -> moevit.MobileViTV2:
    torch.manual_seed(0)
    model = moevit.create_model("mobilevitv2_050", num_classes=3,
                                moe=moevit.MoEConfig(layers=(4, 5, 8), num_experts=4, expert_hidden=16, top_k=top_k))
    with torch.no_grad():  # spread the centroids so routing is not one expert everywhere
        for layer in model.moe_layers().values():
            layer.router.centroids.normal_(0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Batches of a few 64 px images: one thread is faster, and immune to other processes on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset():
    return open_dataset(DATA, image_size=64, split="eval")


@pytest.fixture(scope="module")
def profiled(dataset):
    model = tiny_model()
    return model, profile_model(model, dataset, batch_size=3)


def test_counts_sum_to_patches_times_images_times_top_k(profiled, dataset):
    _, stats = profiled
    n = len(dataset)
    assert stats["images"] == n and sum(stats["class_images"]) == n
    grids = {ls["layer"]: ls["grid"] for ls in stats["layers"]}
    # 64 px: stage 3 (layers 2-5) sees 4x4 features -> a 2x2 patch grid; stage 4 (6-8) 2x2 -> 1x1.
    assert grids == {4: [2, 2], 5: [2, 2], 8: [1, 1]}
    for ls in stats["layers"]:
        ppe = ls["patches_per_expert"]
        assert sum(ppe["total"]) == ls["patches"] * n * 1
        assert sum(ppe["mean"]) == pytest.approx(ls["patches"])
        assert all(p95 <= mx + 1e-9 for p95, mx in zip(ppe["p95"], ppe["max"], strict=True))
        cl = np.array(ls["class_patches_per_expert"])
        assert cl.sum(axis=1) == pytest.approx(np.full(3, ls["patches"]))
        # affinity: per-class mean of a softmax over experts -> each row sums to 1
        assert np.array(ls["affinity"]).sum(axis=1) == pytest.approx(np.ones(3))


def test_coactivation_rows_and_columns(profiled):
    _, stats = profiled
    by = {ls["layer"]: ls for ls in stats["layers"]}
    pairs = [(c["from_layer"], c["to_layer"]) for c in stats["coactivation"]]
    assert pairs == [(4, 5), (5, 8)]
    for co in stats["coactivation"]:
        a, b = by[co["from_layer"]], by[co["to_layer"]]
        m = np.array(co["patches"])
        assert m.shape == (a["num_experts"], b["num_experts"])
        assert m.sum() == pytest.approx(b["patches"])
        # columns: patches routed to j at b (per image); rows: i's share at a mapped to b's grid (whole multiples)
        assert m.sum(axis=0) == pytest.approx(np.array(b["patches_per_expert"]["mean"]))
        scale = b["patches"] / a["patches"]
        assert m.sum(axis=1) == pytest.approx(np.array(a["patches_per_expert"]["mean"]) * scale)
        cond = np.array(co["conditional"])
        used = m.sum(axis=1) > 0
        assert cond[used].sum(axis=1) == pytest.approx(np.ones(used.sum()))
        assert np.all(cond[~used] == 0)


def test_coactivation_follows_the_spatial_rule(dataset):
    # Recompute one pair by hand on one batch: layer 5's 2x2 routing averaged down to layer 8's single patch.
    model = tiny_model()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    stats = profile_model(model, dataset, batch_size=len(dataset), count_dense=False)
    with record_routing(model) as rec:
        model(x)
    r5 = rec[5].expert_idx_BNK[:, :, 0]  # [B, 4]
    r8 = rec[8].expert_idx_BNK[:, 0, 0]  # [B]
    want = np.zeros((4, 4))
    for b in range(len(dataset)):
        for n in range(4):
            want[int(r5[b, n]), int(r8[b])] += 0.25
    want /= len(dataset)
    assert np.array(stats["coactivation"][1]["patches"]) == pytest.approx(want)


def test_class_affinity_by_hand():
    aff = ClassAffinity(3, 2)
    aff.add(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]), torch.tensor([0, 2]))
    aff.add(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([0]))
    # class 0: patches (1,0) (0,1) (1,0) (1,0) -> (0.75, 0.25); class 1: no patches -> zeros; class 2: (0.5, 0.5)
    assert aff.affinity.tolist() == [[0.75, 0.25], [0.0, 0.0], [0.5, 0.5]]


def test_profile_and_moe_analyze_give_the_same_affinity(dataset):
    model = tiny_model()
    stats = profile_model(model, dataset, batch_size=3, count_dense=False)
    by_class = routing_by_class(model, dataset, num_batches=len(dataset), batch_size=5)
    for ls in stats["layers"]:
        assert np.array(ls["affinity"]) == pytest.approx(by_class[ls["layer"]]["affinity"].numpy(), abs=1e-6)


def test_model_figures_and_fingerprint(profiled):
    model, stats = profiled
    assert stats["fingerprint"] == model_fingerprint(model)
    assert stats["arch"] == "mobilevitv2_050" and stats["image_size"] == 64 and stats["top_k"] == 1
    assert stats["pixels_per_patch"] == 4
    assert stats["total_macs"] == count_macs(model, 64)
    assert stats["trunk_macs"] + stats["expert_macs"] == stats["total_macs"]
    dense = moevit.build_model(dataclasses.replace(model.config, moe=None))
    assert stats["dense_macs"] == count_macs(dense, 64)
    for ls in stats["layers"]:
        layer = model.moe_layers()[ls["layer"]]
        assert ls["dim"] == layer.experts.dim and ls["expert_hidden"] == 16 and ls["num_experts"] == 4
        C, K = ls["dim"], 16
        assert ls["expert_params"] == C + C + K * C + K + C * K + C + C + 1  # affine, fc1, fc2, correction, alpha
        assert ls["expert_weight_bytes"] == 4 * ls["expert_params"]
        assert ls["expert_macs_per_token"] == 2 * C * K
    expert_bytes = sum(4 * ls["expert_params"] * 4 for ls in stats["layers"])
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stats["trunk_weight_bytes"] == state - expert_bytes
    parsed = parse_stats(json.loads(json.dumps(stats)))
    assert parsed.moe_layers() == {4: 4, 5: 4, 8: 4}
    assert model.training is False and not any(m.tap._forward_hooks for m in model.moe_layers().values())


def test_top_2_counts_both_slots(dataset):
    stats = profile_model(tiny_model(top_k=2), dataset, batch_size=4, count_dense=False)
    assert stats["top_k"] == 2 and stats["dense_macs"] is None
    for ls in stats["layers"]:
        assert sum(ls["patches_per_expert"]["total"]) == ls["patches"] * len(dataset) * 2
    for co in stats["coactivation"]:
        assert np.array(co["patches"]).sum() == pytest.approx(
            next(ls["patches"] for ls in stats["layers"] if ls["layer"] == co["to_layer"]))


def test_select_images_is_seeded_and_spread():
    assert select_images(10, None, 0) == list(range(10))
    assert select_images(10, 50, 0) == list(range(10))
    a = select_images(100, 10, 0)
    assert a == select_images(100, 10, 0) and a == sorted(a) and len(set(a)) == 10 and a != list(range(10))
    with pytest.raises(ValueError):
        select_images(10, 0, 0)


def test_dense_model_is_refused(dataset):
    with pytest.raises(ValueError, match="no MoE layers"):
        profile_model(moevit.create_model("mobilevitv2_050", num_classes=3), dataset)


def test_cli_profile_then_partition(tmp_path, capsys):
    model = tiny_model()
    ck = save_checkpoint(model, tmp_path / "moe.safetensors")
    out = tmp_path / "stats.json"
    rc = profile_main(["--model", str(ck), "--data", DATA, "--out", str(out), "--image-size", "64",
                       "--no-dense", "--images", "3"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    stats = load_stats(out)
    assert stats.images == 3 and stats.fingerprint == checkpoint_fingerprint(ck) == model_fingerprint(model)
    assert "fingerprint" in stdout
    sites = tmp_path / "sites.yaml"
    sites.write_text(
        "model: moe.safetensors\ncoordinator: cam\nsites:\n"
        "  cam: {address: 127.0.0.1:50050, device: {gflops: 8, memory_mb: 64, active_w: 4, idle_w: 1}}\n"
        "  pi: {address: 127.0.0.1:50051, device: {gflops: 4, memory_mb: 32, active_w: 3, idle_w: 1}}\n"
        "links:\n  - {between: [cam, pi], bandwidth_mbps: 20, latency_ms: 4}\n")
    rc = partition_main(["--topology", str(sites), "--stats", str(out), "--objective", "energy", "--out",
                         str(tmp_path / "placement.yaml")])
    stdout, err = capsys.readouterr()
    assert rc == 0, err and "round-robin" in stdout
    rc = profile_main(["--model", str(tmp_path / "missing.safetensors"), "--data", DATA, "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("moe-profile: error: ") and len(err.strip().splitlines()) == 1
    dense = save_checkpoint(moevit.create_model("mobilevitv2_050", num_classes=3), tmp_path / "dense.safetensors")
    rc = profile_main(["--model", str(dense), "--data", DATA, "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 2 and "no MoE layers" in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_file_is_left_out_never_replaced_by_another_image(tmp_path):
    """A folder with a corrupt file: the stats count each readable image once (issue 22: a folder dataset's
    ``__getitem__`` puts the next readable image in an unreadable one's place, which would count it twice)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    data = open_dataset(f"folder:{tmp_path}", image_size=64, split="train")
    broken = [i for i, item in enumerate(data.items) if "broken" in str(item)]
    assert len(broken) == 1, "the seeded split should keep the broken file in train"
    labels = [int(data.load(i)[1]) for i in range(len(data)) if i not in broken]
    stats = profile_model(tiny_model(), data, batch_size=4, count_dense=False)
    assert stats["images"] == len(data) - 1
    assert stats["class_images"] == np.bincount(labels, minlength=3).tolist()


def test_moe_analyze_routing_sees_every_class_of_a_class_ordered_split():
    """Held-out files are ordered by class: a few batches must still be drawn from every class (the first items
    alone gave the last class no patches, and the summary then grouped it under expert 0)."""
    from moevit.analysis import summarize_layer

    model = tiny_model()
    ordered = [(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)), i // 10) for i in range(30)]
    by_class = routing_by_class(model, ordered, num_batches=3, batch_size=4)  # 12 of 30 items, 10 per class
    for routed in by_class.values():
        assert (routed["patches"] > 0).all()
    starved = {"affinity": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 0.0]]), "usage": torch.tensor(
        [[0.9, 0.1], [0.2, 0.8], [0.0, 0.0]]), "patches": torch.tensor([8.0, 8.0, 0.0])}
    s = summarize_layer(starved["affinity"], starved["usage"], ["a", "b", "c"], patches=starved["patches"])
    assert s["classes_by_expert"] == {"0": ["a"], "1": ["b"]} and s["classes_without_patches"] == ["c"]
    assert s["background_experts"] == [0, 1]  # both used by every class that has patches (2 of 2 >= 0.8)
